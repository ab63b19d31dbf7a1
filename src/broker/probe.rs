//! Whether the worker may publish everywhere it must (`check`, and each
//! session start), found out without delivering anything: a missing write
//! permission or a deleted exchange would otherwise only show when the first
//! outcome or parked copy fails, after its decision was applied at the
//! provider.

use lapin::{
    BasicProperties, ChannelState, Connection, options::BasicPublishOptions,
    protocol::AMQPErrorKind,
};

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
/// the rollback that follows then fails with the broker's reply. Both checks
/// are per exchange, whatever the routing key, so one publish on the default
/// exchange stands for the copies to `P.dead` and to every retry tier.
///
/// One rollback per exchange, on one channel: a round trip more than a
/// single rollback, and it tells which exchange refused without reading the
/// broker's reply text.
pub(crate) async fn may_publish(conn: &Connection, topology: &Topology) -> Result<(), ProbeError> {
    let ch = conn.create_channel().await?;
    ch.tx_select().await?;
    let targets = [
        (
            topology.outcomes(),
            PROBE_KEY.to_owned(),
            format!("exchange {}", topology.outcomes()),
        ),
        (
            String::new(),
            topology.dead(),
            format!(
                "the default exchange (amq.default), which carries the copies to {} and {}",
                topology.dead(),
                topology.retry_queue("*")
            ),
        ),
    ];
    for (exchange, key, target) in targets {
        let probed = async {
            ch.basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default().with_type("approval-worker.probe".into()),
            )
            .await?;
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
        // The broker's close overtook the rollback: lapin refuses to send on
        // a closing channel and keeps the reason to itself. Only a refusal
        // closes the channel here, so the target is still known.
        lapin::ErrorKind::InvalidChannelState(ChannelState::Closing | ChannelState::Closed, _) => {
            ProbeError::Refused {
                target,
                reply: "the broker closed the channel on the probe".to_owned(),
            }
        }
        _ => ProbeError::Broker(e),
    }
}
