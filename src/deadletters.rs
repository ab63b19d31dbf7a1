//! Parking-lot tools: list parked decisions, and replay them into
//! `P.decisions` with fresh attempt counters.
//!
//! A replayed message is acknowledged in `P.dead` only after its republish
//! was confirmed, so interrupting a replay can at worst leave a message in
//! both queues (harmless: the decision's idempotency key and reconciliation
//! absorb the repeat), never in neither.

use lapin::{
    BasicProperties, Channel,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions},
};
use serde_json::Value;

use crate::broker::{PublishError, Publisher, Topology, headers};

/// One parked message, as shown by `list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedSummary {
    pub decision_id: Option<String>,
    pub provider: Option<String>,
    pub action: Option<String>,
    pub kind: String,
    pub reason: String,
    pub attempts: i64,
    pub first_received_at: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub limit: Option<usize>,
    pub provider: Option<String>,
    pub kind: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("republish failed, the message stays parked: {0}")]
    Publish(#[from] PublishError),
}

fn summarize(msg: &BasicGetMessage) -> ParkedSummary {
    let h = msg.delivery.properties.headers().as_ref();
    let body: Value = serde_json::from_slice(&msg.delivery.data).unwrap_or(Value::Null);
    let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
    // Messages the broker dead-lettered itself (delivery limit) have no
    // x-approval headers; their reason is in x-first-death-reason.
    let broker_reason = headers::get_str(h, "x-first-death-reason");
    ParkedSummary {
        decision_id: field("decision_id"),
        provider: field("provider"),
        action: field("action"),
        kind: headers::get_str(h, headers::ERROR_KIND)
            .or_else(|| broker_reason.clone())
            .unwrap_or_else(|| "unknown".to_owned()),
        reason: headers::get_str(h, headers::ERROR)
            .or_else(|| broker_reason.map(|r| format!("dead-lettered by the broker: {r}")))
            .unwrap_or_default(),
        attempts: headers::get_int(h, headers::ATTEMPTS).unwrap_or(0),
        first_received_at: headers::get_str(h, headers::FIRST_RECEIVED_AT),
    }
}

impl Filter {
    fn matches(&self, s: &ParkedSummary) -> bool {
        self.provider
            .as_ref()
            .is_none_or(|p| s.provider.as_ref() == Some(p))
            && self.kind.as_ref().is_none_or(|k| &s.kind == k)
    }
}

/// Reads up to `limit` matching parked messages without removing them.
pub async fn list(
    channel: &Channel,
    topology: &Topology,
    filter: &Filter,
) -> Result<Vec<ParkedSummary>, DeadLetterError> {
    walk(channel, topology, filter, None).await
}

/// Moves matching parked messages back to `P.decisions`, each removed from
/// the parking lot only once its republish is confirmed. Returns the
/// replayed summaries.
pub async fn replay(
    channel: &Channel,
    publisher: &Publisher,
    topology: &Topology,
    filter: &Filter,
) -> Result<Vec<ParkedSummary>, DeadLetterError> {
    walk(channel, topology, filter, Some(publisher)).await
}

/// Reads the parking lot; with `replay_to`, republishes each match. Messages
/// that stay are held unacknowledged until the end, so basic.get does not
/// hand the same one back again, then released.
async fn walk(
    channel: &Channel,
    topology: &Topology,
    filter: &Filter,
    replay_to: Option<&Publisher>,
) -> Result<Vec<ParkedSummary>, DeadLetterError> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    let result = async {
        while filter.limit.is_none_or(|l| out.len() < l) {
            let Some(msg) = channel
                .basic_get(topology.dead().into(), BasicGetOptions::default())
                .await?
            else {
                break;
            };
            let summary = summarize(&msg);
            if !filter.matches(&summary) {
                held.push(msg);
                continue;
            }
            match replay_to {
                None => held.push(msg),
                Some(publisher) => {
                    let props = fresh_properties(&msg.delivery.properties);
                    let republished = publisher
                        .publish("", &topology.decisions(), &msg.delivery.data, props, true)
                        .await;
                    if let Err(e) = republished {
                        held.push(msg);
                        return Err(e.into());
                    }
                    msg.delivery.ack(BasicAckOptions::default()).await?;
                }
            }
            out.push(summary);
        }
        Ok::<_, DeadLetterError>(())
    }
    .await;
    release(held).await;
    result?;
    Ok(out)
}

/// The original properties without any attempt history or parking reason.
fn fresh_properties(props: &BasicProperties) -> BasicProperties {
    headers::copy_properties(
        props,
        headers::without(props.headers().as_ref(), headers::HISTORY),
    )
}

async fn release(held: Vec<BasicGetMessage>) {
    for msg in held {
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        // If this fails the channel is gone, and the broker requeues anyway.
        let _ = msg.delivery.nack(requeue).await;
    }
}
