//! Shards from peers. A contributor told to load a span fetches the shard from the peers its
//! `LoadSpan` names before trying the coordinator: it offers each a direct channel for blobs
//! (`ChannelPurpose::Blobs`), asks for the whole shard with a `PeerMessage::BlobRequest`, and
//! reassembles the `Blob` frames that come back, which its caller checks against the CID before
//! keeping or using a byte. A contributor named in a `Lend` answers that borrower's offers (and
//! no one else's), a channel at a time, and serves the blobs lent, and only those, from its
//! verified cache, each once.

use std::convert::identity;

use tessera_protocol::encode_control;

use super::*;

/// The most borrowers a contributor lends to at once; more `Lend`s are refused (the borrower
/// then fetches from the coordinator).
pub(super) const MAX_LENDS: usize = 4;
/// How long a borrower has to offer its channel after the `Lend`.
pub(super) const LEND_WINDOW: Duration = Duration::from_secs(60);
/// How long a lent channel stays open at most, whatever the borrower does.
const LEND_TIME: Duration = Duration::from_secs(600);
/// Blob requests served over one lent channel (a span's shard takes one).
const MAX_REQUESTS: usize = 16;
/// The longest request a borrower may send (a CID and three numbers take far less).
const MAX_REQUEST_BYTES: usize = 1024;
/// How long a borrower waits for the next part of a blob before trying elsewhere.
const BORROW_IDLE: Duration = Duration::from_secs(20);
/// After `BORROW_GRACE`, a lender sending slower than `MIN_BORROW_RATE` bytes a second on
/// average is left for the next source: a trickle would hold the span's load up for good.
const BORROW_GRACE: Duration = Duration::from_secs(10);
const MIN_BORROW_RATE: f64 = 256.0 * 1024.0;
/// How long a borrower waits for a lender to answer its offer and open the channel (a lender
/// is native, so quick; one that refused the `Lend` never answers).
const BORROW_ANSWER: Duration = Duration::from_secs(10);

impl LinkContext {
    /// A `Lend`: `borrower` may offer a channel and fetch `blobs` from here over it.
    pub(super) fn lend(&self, borrower: ContributorId, blobs: Vec<String>) {
        let count = blobs.len();
        match lock(&self.lends).lend(borrower, blobs, Instant::now()) {
            Ok(()) => eprintln!("tessera contribute: lending {count} shard(s) to contributor {borrower}"),
            Err(e) => eprintln!("tessera contribute: not lending shards to contributor {borrower}: {e}"),
        }
    }

    /// An offer from `borrower` of a channel to fetch lent blobs over: answered only under a
    /// standing `Lend` to it.
    pub(super) fn borrower_offered(&self, borrower: ContributorId, sdp: String) {
        let mut lends = lock(&self.lends);
        let Some(epoch) = lends.offer(borrower, Instant::now()) else {
            eprintln!("tessera contribute: ignoring an offer from contributor {borrower} to fetch blobs: nothing is lent to it");
            return;
        };
        let task = tokio::spawn(self.clone().lend_channel(borrower, epoch, sdp));
        lends.start(borrower, epoch, LinkTask(task.abort_handle()));
    }

    /// Serves the channel `borrower` offers until it closes (or `LEND_TIME` passes), then ends
    /// the lend.
    async fn lend_channel(self, borrower: ContributorId, epoch: u64, offer: String) {
        match tokio::time::timeout(LEND_TIME, self.serve_borrower(borrower, epoch, &offer)).await {
            Ok(Ok(served)) => eprintln!("tessera contribute: lent {served} blob(s) to contributor {borrower}"),
            Ok(Err(e)) => eprintln!("tessera contribute: lending to contributor {borrower} stopped: {e:#}"),
            Err(_) => eprintln!("tessera contribute: lending to contributor {borrower} stopped after {} s", LEND_TIME.as_secs()),
        }
        lock(&self.lends).ended(borrower, epoch, Instant::now());
    }

    /// Answers the offer, then serves requests until the borrower closes the channel; how many
    /// blobs it was sent. Anything but a blob request ends the lend.
    async fn serve_borrower(&self, borrower: ContributorId, epoch: u64, offer: &str) -> anyhow::Result<usize> {
        let (answer, mut channel) = self.endpoint.accept_offer(offer).await.context("answering its offer")?;
        send(&self.coordinator, &ContributorMessage::Signal { from: self.own, to: borrower, payload: SignalPayload::Answer { sdp: answer } }).await?;
        channel.opened().await?;
        let sender = channel.sender();
        let (mut served, mut requests) = (0, 0);
        loop {
            let text = match channel.recv().await {
                Some(PeerEvent::Message(Message::Text(text))) => text,
                Some(PeerEvent::Message(Message::Binary(_))) => bail!("it sent binary data, and a borrower sends requests only"),
                Some(PeerEvent::Connected | PeerEvent::Open) => continue,
                // Closing the channel is how a borrower says it is done.
                Some(PeerEvent::Closed(_)) | None => return Ok(served),
            };
            let (cid, offset, length, stream) = match tessera_protocol::decode_control::<PeerMessage>(text.as_bytes(), MAX_REQUEST_BYTES) {
                Ok(PeerMessage::BlobRequest { cid, offset, length, stream }) => (cid, offset, length, stream),
                Ok(_) => bail!("it sent a message other than a blob request"),
                Err(e) => bail!("it sent a request that does not decode: {e}"),
            };
            requests += 1;
            if requests > MAX_REQUESTS {
                bail!("it asked for more than {MAX_REQUESTS} blobs over one channel");
            }
            let read = if lock(&self.lends).lends(borrower, epoch, &cid) {
                let (blobs, cid) = (self.blobs.clone(), cid.clone());
                tokio::task::spawn_blocking(move || blobs.request(&cid, offset, length)).await.map_err(|e| (ErrorCode::Internal, e.to_string())).and_then(identity)
            } else {
                Err((ErrorCode::BlobNotFound, format!("{cid} is not lent to contributor {borrower}")))
            };
            match read {
                Ok(mut bytes) => {
                    if self.perturb
                        && let Some(byte) = bytes.first_mut()
                    {
                        *byte ^= 0xff;
                    }
                    send_payload(&sender, stream, PayloadKind::Blob, &bytes).await?;
                    // Each blob is lent once (whole, or the range asked for).
                    lock(&self.lends).sent(borrower, epoch, &cid);
                    served += 1;
                }
                Err((code, message)) => sender.send(Message::Text(encode_control(&PeerMessage::Error { code, message }))).await?,
            }
        }
    }

    /// Fetches blob `cid` whole from `lender`, which was told to lend it to us: offers it a
    /// channel for blobs, asks, and reassembles what comes back. The bytes are unchecked: the
    /// caller checks them against the CID.
    pub(super) async fn borrow(&self, lender: ContributorId, cid: &Cid) -> anyhow::Result<Vec<u8>> {
        let mut channel = self.offer(lender, ChannelPurpose::Blobs, BORROW_ANSWER).await?;
        const STREAM: u64 = 1;
        let request = PeerMessage::BlobRequest { cid: cid.to_string(), offset: 0, length: 0, stream: STREAM };
        channel.send(Message::Text(encode_control(&request))).await?;
        let mut reassembler = Reassembler::new(ReassemblyLimits { max_message_bytes: MAX_BLOB_BYTES, max_partial_messages: 1, max_buffered_bytes: MAX_BLOB_BYTES });
        let (started, mut received) = (Instant::now(), 0usize);
        let outcome = loop {
            let elapsed = started.elapsed();
            if elapsed > BORROW_GRACE && (received as f64) < MIN_BORROW_RATE * elapsed.as_secs_f64() {
                break Err(anyhow!("{received} bytes in {:.0} s is too slow", elapsed.as_secs_f64()));
            }
            let message = match tokio::time::timeout(BORROW_IDLE, channel.recv()).await {
                Ok(Some(PeerEvent::Message(message))) => message,
                Ok(Some(PeerEvent::Connected | PeerEvent::Open)) => continue,
                Ok(Some(PeerEvent::Closed(reason))) => break Err(anyhow!("the channel closed: {reason}")),
                Ok(None) => break Err(anyhow!("the transport stopped")),
                Err(_) => break Err(anyhow!("nothing arrived for {} s", BORROW_IDLE.as_secs())),
            };
            received += message.len();
            let decoded = match &message {
                Message::Text(text) => tessera_protocol::decode::<PeerMessage>(Incoming::Text(text)),
                Message::Binary(bytes) => tessera_protocol::decode::<PeerMessage>(Incoming::Binary(bytes)),
            };
            match decoded {
                Ok(Decoded::Chunk(chunk)) => match reassembler.push(chunk) {
                    Ok(Some(payload)) if payload.stream == STREAM && payload.kind == PayloadKind::Blob => break Ok(payload.bytes),
                    Ok(Some(payload)) => break Err(anyhow!("it sent a {:?} payload on stream {}", payload.kind, payload.stream)),
                    Ok(None) => {}
                    Err(e) => break Err(anyhow!("it sent a bad frame: {e}")),
                },
                Ok(Decoded::Control(PeerMessage::Error { code, message })) => break Err(anyhow!("it refused ({code:?}): {message}")),
                Ok(Decoded::Control(_)) => break Err(anyhow!("it sent a message other than the blob")),
                Err(e) => break Err(anyhow!("it sent a message that does not decode: {e}")),
            }
        };
        channel.close().await;
        outcome
    }
}
