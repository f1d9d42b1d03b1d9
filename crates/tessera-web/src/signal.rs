//! Signalling with the coordinator on `GET /ws`: the offer this tab sends and the answer it reads
//! back (the coordinator's side is `tessera_rtc::signal`, which needs tokio), and the
//! DataChannel's label.

use serde::{Deserialize, Serialize};
use tessera_protocol::{ErrorCode, ProtocolError, encode_control};

/// The DataChannel's label, as the coordinator expects it (`tessera_rtc::CHANNEL_LABEL`).
pub const CHANNEL_LABEL: &str = "tessera";

/// A signalling message on `GET /ws` (the coordinator's side is `tessera_rtc::signal`, which
/// needs tokio): our `{"type":"offer","sdp":…}`, and its reply, `{"type":"answer","sdp":…}` or
/// `{"type":"error","code":…,"message":…}`. One flat struct: an internally tagged enum would
/// cost the wasm a buffering deserializer per variant.
#[derive(Serialize, Deserialize)]
struct Signal {
    r#type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sdp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl tessera_protocol::Message for Signal {
    const TYPES: &'static [&'static str] = &["offer", "answer", "error"];
}

/// The offer to send for this SDP.
pub fn offer(sdp: &str) -> String {
    encode_control(&Signal { r#type: "offer".into(), sdp: Some(sdp.into()), code: None, message: None })
}

/// The SDP of the coordinator's answer, or why there is none.
pub fn answer(text: &str) -> Result<String, String> {
    match tessera_protocol::decode_control::<Signal>(text.as_bytes(), tessera_protocol::MAX_TEXT_MESSAGE) {
        Ok(Signal { r#type, sdp, code, message }) => match (r#type.as_str(), sdp) {
            ("answer", Some(sdp)) => Ok(sdp),
            ("error", _) => Err(format!(
                "the coordinator refused the offer ({:?}): {}",
                code.unwrap_or(ErrorCode::Unknown),
                message.unwrap_or_default()
            )),
            (kind, _) => Err(format!("the coordinator answered with {kind:?} and no SDP")),
        },
        Err(ProtocolError::ControlTooLarge { len, max }) => Err(format!("the signalling answer of {len} bytes is over the limit of {max}")),
        Err(e) => Err(format!("the signalling answer does not decode: {e}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tessera_protocol::decode_control;

    use super::*;

    #[test]
    fn signalling_speaks_the_coordinators_messages() {
        use tessera_rtc::signal::SignalMessage;
        assert_eq!(CHANNEL_LABEL, tessera_rtc::CHANNEL_LABEL);
        assert_eq!(decode_control::<SignalMessage>(offer("v=0\r\n").as_bytes(), usize::MAX).unwrap(), SignalMessage::Offer { sdp: "v=0\r\n".into() });
        let reply = |message: &SignalMessage| answer(&encode_control(message));
        assert_eq!(reply(&SignalMessage::Answer { sdp: "v=0 answer".into() }), Ok("v=0 answer".into()));
        let refusal = reply(&SignalMessage::Error { code: ErrorCode::Internal, message: "not accepting peers".into() });
        assert_eq!(refusal, Err("the coordinator refused the offer (Internal): not accepting peers".into()));
        assert_eq!(reply(&SignalMessage::Offer { sdp: "x".into() }), Err("the coordinator answered with \"offer\" and no SDP".into()));
        assert_eq!(answer(r#"{"type":"answer"}"#), Err("the coordinator answered with \"answer\" and no SDP".into()));
        assert!(answer("<html>").unwrap_err().starts_with("the signalling answer does not decode: "));
        assert!(answer(&"x".repeat(70_000)).unwrap_err().contains("over the limit"));
    }
}
