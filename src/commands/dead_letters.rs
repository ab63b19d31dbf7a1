//! `approval-worker dead-letters`: list parked decisions, and replay them
//! into `P.decisions` with fresh attempt counters.
//!
//! A replayed message is acknowledged in `P.dead` only after its republish
//! was confirmed, so interrupting a replay can at worst leave a message in
//! both queues (harmless: the decision's idempotency key and reconciliation
//! absorb the repeat), never in neither.

use std::process::ExitCode;

use lapin::{
    BasicProperties, Channel,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions},
};
use serde_json::Value;

use crate::{
    broker::{self, PublishError, Publisher, Topology, headers},
    settings::Settings,
};

#[derive(clap::Subcommand)]
pub enum DeadLetters {
    /// Print parked decisions with their error kind, reason and attempts, without removing them.
    List(Filter),
    /// Move parked decisions back to P.decisions with fresh attempt counters.
    Replay(Filter),
}

// No doc comment: clap would show it instead of the subcommand's.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Filter {
    /// At most this many messages.
    #[arg(long)]
    limit: Option<usize>,
    /// Only this provider's decisions.
    #[arg(long)]
    provider: Option<String>,
    /// Only this error kind (invalid, provider_disabled, exhausted, ...).
    #[arg(long)]
    kind: Option<String>,
}

pub async fn run(settings: Settings, cmd: DeadLetters) -> ExitCode {
    let (filter, replay) = match cmd {
        DeadLetters::List(filter) => (filter, false),
        DeadLetters::Replay(filter) => (filter, true),
    };
    let conn = match broker::Nodes::new(&settings)
        .connect("approval-worker dead-letters")
        .await
    {
        Ok(c) => c,
        Err(e) => {
            // `e` names each node tried, password masked.
            eprintln!("dead-letters: broker not reachable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let topology = Topology::new(&settings.amqp.prefix, settings.amqp.delivery_limit);
    let result = async {
        let channel = conn.create_channel().await?;
        topology.declare(&channel).await?;
        let publisher = if replay {
            Some(Publisher::new(conn.create_channel().await?).await?)
        } else {
            None
        };
        walk(&channel, &topology, &filter, publisher.as_ref()).await
    }
    .await;
    let _ = conn.close(200, "dead-letters done".into()).await;
    match result {
        Ok(items) => {
            for s in &items {
                println!(
                    "{}\t{}\t{}\tkind={}\tattempts={}\tfirst_received_at={}\treason={}",
                    s.decision_id.as_deref().unwrap_or("-"),
                    s.provider.as_deref().unwrap_or("-"),
                    s.action.as_deref().unwrap_or("-"),
                    s.kind,
                    s.attempts,
                    s.first_received_at.as_deref().unwrap_or("-"),
                    s.reason,
                );
            }
            let verb = if replay { "replayed to" } else { "parked in" };
            println!(
                "{} decision(s) {verb} {}",
                items.len(),
                if replay {
                    topology.decisions()
                } else {
                    topology.dead()
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dead-letters: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One parked message, as printed.
#[derive(Debug)]
struct ParkedSummary {
    decision_id: Option<String>,
    provider: Option<String>,
    action: Option<String>,
    kind: String,
    reason: String,
    attempts: i64,
    first_received_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Topology(#[from] crate::broker::TopologyError),
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

/// Reads up to `limit` matching parked messages; with `replay_to`, moves
/// each back to `P.decisions`, removed from the parking lot only once its
/// republish is confirmed. Messages that stay are held unacknowledged until
/// the end, so basic.get does not hand the same one back again, then released.
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
    headers::copy_properties(props, headers::carried(props.headers().as_ref()))
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
