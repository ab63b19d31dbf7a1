//! Watching the outcomes exchange from the outside, the way any consumer on
//! the bus would: used by the `demo` and `bench` commands.

use futures_util::StreamExt;
use lapin::{
    Channel,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use tokio::sync::mpsc;

use crate::broker::Topology;

/// Binds a private queue to `P.outcomes` and forwards every event's JSON
/// text unparsed: the bench counts most events without reading them, and
/// parsing here would take CPU from the worker it measures.
pub(crate) async fn outcomes(
    channel: &Channel,
    topology: &Topology,
) -> Result<mpsc::UnboundedReceiver<Vec<u8>>, lapin::Error> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            topology.outcomes().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "outcome-capture".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if tx.send(delivery.data).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
