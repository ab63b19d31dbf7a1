//! Whether the worker may publish everywhere it must (`check`, and each
//! session start), found out without delivering anything: a missing write
//! permission or a deleted exchange would otherwise only show when the first
//! outcome or parked copy fails, after its decision was applied at the
//! provider.

use lapin::{BasicProperties, Connection, options::BasicPublishOptions, protocol::AMQPErrorKind};

use super::Topology;

/// The routing key of the probe on `P.outcomes`: one no consumer binds, in
/// case a broker ever delivered a rolled-back publish.
const PROBE_KEY: &str = "probe.check";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// The broker refused a publish (ACCESS_REFUSED for a missing write
    /// permission, NOT_FOUND for a missing exchange).
    #[error("may not publish to {target}: {reply}")]
    Refused { target: String, reply: String },
    #[error("broker error while checking publish permissions: {0}")]
    Broker(#[from] lapin::Error),
}

/// Publishes one probe to each exchange the worker publishes on, inside a
/// transaction that is rolled back, so nothing is ever routed. RabbitMQ
/// checks write permission and the exchange's existence when a publish
/// arrives, not at commit, and answers a refusal by closing the channel:
/// the rollback that follows then fails with the broker's reply.
///
/// One rollback per exchange, on one channel: it costs a round trip more
/// than a single rollback and tells which exchange refused without reading
/// the broker's reply text.
pub(crate) async fn may_publish(conn: &Connection, topology: &Topology) -> Result<(), ProbeError> {
    let ch = conn.create_channel().await?;
    ch.tx_select().await?;
    let mut copies = vec![topology.dead()];
    copies.extend(topology.retry_queues());
    let targets = [
        (
            topology.outcomes(),
            vec![PROBE_KEY.to_owned()],
            format!("exchange {}", topology.outcomes()),
        ),
        (
            String::new(),
            copies,
            format!(
                "the default exchange (amq.default), which carries the copies to {} and {}",
                topology.dead(),
                topology.retry_queue("*")
            ),
        ),
    ];
    for (exchange, keys, target) in targets {
        let probed = async {
            for key in &keys {
                ch.basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    b"",
                    BasicProperties::default().with_type("approval-worker.probe".into()),
                )
                .await?;
            }
            ch.tx_rollback().await
        }
        .await;
        if let Err(e) = probed {
            return Err(refusal(target, e));
        }
    }
    let _ = ch.close(200, "probe done".into()).await;
    Ok(())
}

/// A channel-level refusal names its target; anything else (the connection
/// lost) is a broker error as it is.
fn refusal(target: String, e: lapin::Error) -> ProbeError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
            ProbeError::Refused {
                target,
                reply: amqp
                    .get_message()
                    .as_str()
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect(),
            }
        }
        _ => ProbeError::Broker(e),
    }
}
