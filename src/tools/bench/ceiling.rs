//! The broker's own ceiling: a bare relay with the worker's broker settings.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions,
    },
    types::FieldTable,
};
use tokio_util::task::TaskTracker;

use super::{BenchError, feed::Feed};
use crate::{
    broker::{self, Topology},
    tools::sim::samples,
};

/// The broker's relay ceiling with the worker's settings and no HTTP. Its
/// queues are declared once and removed after the last round: deleting a
/// quorum queue keeps the broker busy for a while, and that work must not
/// fall into the worker phase that follows each ceiling.
///
/// It moves the worker's messages: decisions of the same size in, and out
/// a real outcome event of the run with the property set the worker
/// publishes, since a relay of a small result overstates the ceiling (see
/// the README's Performance section).
pub(super) struct Ceiling {
    feed: Feed,
    outcomes: String,
    bodies: Vec<Vec<u8>>,
    result: Arc<[u8]>,
}

impl Ceiling {
    pub(super) async fn declare(
        conn: &Connection,
        topology: &Topology,
        n: usize,
        result: Vec<u8>,
        provider: &str,
    ) -> Result<Self, BenchError> {
        let body = samples::decision(provider, "reject", "ceiling")
            .to_string()
            .into_bytes();
        Ok(Self {
            // The relay verifies nothing: its decisions go unsigned.
            feed: Feed::declare(conn, topology, None).await?,
            outcomes: topology.outcomes(),
            bodies: vec![body; n],
            result: result.into(),
        })
    }

    /// One round: consume a decision, publish a result, ack, for every
    /// decision of the batch, one task per delivery.
    pub(super) async fn measure(
        &mut self,
        conn: &Connection,
        prefetch: u16,
    ) -> Result<f64, BenchError> {
        let n = self.bodies.len();
        let consume: Channel = conn.create_channel().await?;
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let relay: Channel = conn.create_channel().await?;
        relay
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut consumer = consume
            .basic_consume(
                self.feed.queue.as_str().into(),
                "ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // What every delivery task shares, behind one `Arc` as in the worker.
        let shared = Arc::new((
            relay.clone(),
            consume.clone(),
            self.outcomes.clone(),
            self.result.clone(),
            broker::outcome_properties(&uuid::Uuid::nil().to_string(), Some("ceiling")),
        ));
        let relay_task = tokio::spawn(async move {
            let acks = TaskTracker::new();
            let mut count = 0;
            while let Some(Ok(delivery)) = consumer.next().await {
                let shared = shared.clone();
                acks.spawn(async move {
                    let (relay, consume, outcomes, result, properties) = &*shared;
                    let confirm = relay
                        .basic_publish(
                            outcomes.as_str().into(),
                            "ceiling.applied".into(),
                            BasicPublishOptions::default(),
                            result,
                            properties.clone(),
                        )
                        .await;
                    if let Ok(confirm) = confirm
                        && confirm.await.is_ok()
                    {
                        // Settled on the channel, as the worker does.
                        let _ = consume
                            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                            .await;
                    }
                });
                count += 1;
                if count == n {
                    break;
                }
            }
            acks.close();
            acks.wait().await;
            consumer
        });
        let rate = self.feed.phase("ceiling", self.bodies.clone()).await;
        if rate.is_err() {
            relay_task.abort();
        }
        // Cancel explicitly, and wait for it. A dropped consumer cancels
        // itself in the background; if that ever races the broker's own
        // cancel (the queue deleted), lapin meets a cancel-ok it does not
        // expect and closes the bench's whole connection.
        if let Ok(consumer) = relay_task.await {
            if let Err(e) = consume
                .basic_cancel("ceiling".into(), BasicCancelOptions::default())
                .await
            {
                eprintln!("bench: cancelling the ceiling consumer failed: {e}");
            }
            drop(consumer);
        }
        for channel in [&consume, &relay] {
            let _ = channel.close(200, "ceiling round done".into()).await;
        }
        rate
    }
}
