//! Watching the outcomes exchange from the outside, the way any consumer on
//! the bus would: a private queue for the `demo` and `bench` commands, and a
//! durable one that survives the broker for the integration tests.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use secrecy::SecretString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Topology};

/// Between two connection attempts while the broker is away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

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
    bind(channel, queue.name().as_str(), topology).await?;
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

/// Binds the durable queue `queue` to `P.outcomes` and forwards every event
/// as delivered (body, routing key, properties), on a connection of its own.
/// Each event is acknowledged once handed over; when the broker goes away
/// the capture connects again, and the queue kept what arrived meanwhile.
/// Runs until `stop` or until the receiver is dropped; deleting the queue is
/// the caller's.
pub async fn durable(
    url: &SecretString,
    topology: &Topology,
    queue: &str,
    stop: CancellationToken,
) -> Result<mpsc::UnboundedReceiver<Delivery>, lapin::Error> {
    let name = format!("outcome capture {queue}");
    let conn = broker::connect_url(url, &name).await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    bind(&channel, queue, topology).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (url, queue) = (url.clone(), queue.to_owned());
    tokio::spawn(async move {
        let mut first = Some(conn);
        loop {
            let session = async {
                let conn = match first.take() {
                    Some(conn) => conn,
                    None => broker::connect_url(&url, &name).await?,
                };
                let channel = conn.create_channel().await?;
                let mut consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "outcome-capture".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                while let Some(delivery) = consumer.next().await {
                    let delivery = delivery?;
                    let tag = delivery.delivery_tag;
                    if tx.send(delivery).is_err() {
                        break;
                    }
                    channel.basic_ack(tag, BasicAckOptions::default()).await?;
                }
                Ok::<_, lapin::Error>(())
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = session => {}
            }
            if tx.is_closed() {
                return;
            }
            // A pause between attempts while the broker is away, not a
            // synchronisation: nothing waits on it.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            }
        }
    });
    Ok(rx)
}

async fn bind(channel: &Channel, queue: &str, topology: &Topology) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            topology.outcomes().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}
