//! Publishing with publisher confirms. A publish counts only once the broker
//! acknowledged it and did not return it; callers acknowledge a decision
//! only after every publish it needs succeeded.
//!
//! lapin hands a `basic.return` to whichever confirm on the channel it
//! resolves next, not to the publish it belongs to. So each mandatory
//! publish carries its own id ([`headers::PUBLISH_ID`]), every confirm is
//! read to the end (even one whose caller stopped waiting) and the return
//! it carries recorded under the id it names, and a mandatory publish
//! learns whether it was returned from that record, not from its own
//! confirm.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use lapin::{
    BasicProperties, Channel, Confirmation,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::Notify;

use super::headers;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker channel failed during publish: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker refused the message (nack); it was not stored")]
    Nacked,
    #[error("broker returned the message as unroutable ({0}); is the topology declared?")]
    Returned(String),
    #[error("publisher confirms are not enabled on this channel")]
    Unconfirmed,
    #[error("message not sent: {0}")]
    Oversized(#[from] headers::Oversized),
    #[error("no confirm from the broker within {} ms", .0.as_millis())]
    TimedOut(std::time::Duration),
}

impl PublishError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Broker(_) => "channel_closed",
            PublishError::Nacked => "nacked",
            PublishError::Returned(_) => "returned",
            PublishError::Unconfirmed => "unconfirmed",
            PublishError::Oversized(_) => "oversized",
            PublishError::TimedOut(_) => "timed_out",
        }
    }

    /// Whether only a new session can mend what failed: a closed channel
    /// stays closed, a returned copy means the topology is gone (a new
    /// session declares it again), and a broker that does not confirm
    /// within the timeout is not trusted with the next publish either. A
    /// nack (a full queue) or an oversized message is this publish's own.
    pub fn needs_new_session(&self) -> bool {
        matches!(
            self,
            PublishError::Broker(_)
                | PublishError::Returned(_)
                | PublishError::TimedOut(_)
                | PublishError::Unconfirmed
        )
    }
}

/// A confirmed publisher on one channel. Publishes made on [`Self::channel`]
/// directly bypass the matching of returns: that channel must then carry no
/// mandatory publish of [`Self::publish`].
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    returns: Arc<Returns>,
}

impl Publisher {
    pub async fn new(channel: Channel) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            returns: Arc::default(),
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for this message's confirm. Many tasks publish
    /// concurrently on the one channel; confirms resolve independently. A
    /// mandatory message the broker could not route is `Returned`.
    /// Properties too large for a frame are trimmed (`headers::fit`) or the
    /// message is not sent, so a publish never closes the connection.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let id = mandatory.then(|| uuid::Uuid::new_v4().simple().to_string());
        let properties = match &id {
            Some(id) => {
                let mut table = properties.headers().clone().unwrap_or_default();
                headers::set_str(&mut table, headers::PUBLISH_ID, id);
                properties.with_headers(table)
            }
            None => properties,
        };
        let properties = headers::fit(properties)?;
        let seq = self.returns.open();
        let (channel, returns) = (self.channel.clone(), self.returns.clone());
        let (exchange, routing_key, body) = (exchange.into(), routing_key.into(), body.to_vec());
        let publish = async move {
            let options = BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            };
            let confirm = channel
                .basic_publish(exchange, routing_key, options, &body, properties)
                .await;
            let confirmation = match confirm {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            let (result, carried) = match confirmation {
                Ok(Confirmation::Ack(carried)) => (Ok(()), carried),
                Ok(Confirmation::Nack(carried)) => (Err(PublishError::Nacked), carried),
                Ok(Confirmation::NotRequested) => (Err(PublishError::Unconfirmed), None),
                Err(e) => (Err(e.into()), None),
            };
            returns.settle(seq, carried);
            result?;
            match id {
                Some(id) => match returns.claim(&id).await {
                    Some(reply) => Err(PublishError::Returned(reply)),
                    None => Ok(()),
                },
                None => Ok(()),
            }
        };
        Detached::new(publish).await
    }
}

/// Returns read from confirms, waiting for the publish they name.
#[derive(Default)]
struct Returns {
    ledger: Mutex<Ledger>,
    /// Signalled when the oldest unread confirm is read.
    oldest_read: Notify,
}

#[derive(Default)]
struct Ledger {
    /// Sequence number of the next publish (ours, not the broker's tag).
    next: u64,
    /// Publishes whose confirm is not read yet.
    unread: BTreeSet<u64>,
    /// Returned publishes not yet claimed: publish id to the broker's reply text.
    returned: HashMap<String, String>,
}

impl Returns {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers a publish about to be sent; it stays unread until [`Self::settle`].
    fn open(&self) -> u64 {
        let mut ledger = self.lock();
        let seq = ledger.next;
        ledger.next += 1;
        ledger.unread.insert(seq);
        seq
    }

    /// Marks publish `seq`'s confirm read and records the return it
    /// carried, whichever publish that return belongs to.
    fn settle(&self, seq: u64, carried: Option<BasicReturnMessage>) {
        let mut ledger = self.lock();
        let oldest = ledger.unread.first() == Some(&seq);
        ledger.unread.remove(&seq);
        if let Some(message) = carried {
            let id = headers::get_str(message.properties.headers().as_ref(), headers::PUBLISH_ID);
            if let Some(id) = id {
                let reply = message.reply_text.as_str().to_owned();
                ledger.returned.insert(id, reply);
            }
        }
        drop(ledger);
        if oldest {
            self.oldest_read.notify_waiters();
        }
    }

    /// Whether publish `id`, whose own confirm was read, was returned.
    ///
    /// The broker sends a return before the ack of the same publish; lapin
    /// queues it and hands it to the next confirm it resolves, one per
    /// confirm. So when our confirm resolved, our return was queued behind
    /// at most as many returns as there were publishes still unconfirmed,
    /// all numbered before now: once they are all read, some confirm took
    /// our return. That confirm resolved before the last of them was read,
    /// so it is numbered before that moment: once every publish numbered
    /// before it is read too, the return is recorded.
    async fn claim(&self, id: &str) -> Option<String> {
        for _ in 0..2 {
            let horizon = {
                let mut ledger = self.lock();
                if let Some(reply) = ledger.returned.remove(id) {
                    return Some(reply);
                }
                ledger.next
            };
            self.read_before(horizon).await;
        }
        self.lock().returned.remove(id)
    }

    /// Waits until every publish numbered before `horizon` has its confirm read.
    async fn read_before(&self, horizon: u64) {
        loop {
            let read = self.oldest_read.notified();
            tokio::pin!(read);
            read.as_mut().enable();
            let unread = self.lock().unread.first().copied();
            if unread.is_none_or(|oldest| oldest >= horizon) {
                return;
            }
            read.await;
        }
    }
}

/// A publish that runs to its end even when its caller stops waiting (a
/// timeout, a sibling publish failing in a `try_join!`): its confirm may
/// carry another publish's return, which must still be recorded.
struct Detached<T: Send + 'static> {
    publish: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
}

impl<T: Send + 'static> Detached<T> {
    fn new(publish: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            publish: Some(Box::pin(publish)),
        }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let publish = self
            .publish
            .as_mut()
            .expect("a Detached publish is not polled after it completed");
        let out = publish.as_mut().poll(cx);
        if out.is_ready() {
            self.publish = None;
        }
        out
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(publish) = self.publish.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(publish);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::future::join_all;
    use lapin::{
        Connection, ConnectionProperties,
        options::{QueueDeclareOptions, QueueDeleteOptions},
        types::FieldTable,
    };

    use super::*;

    const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    const TOTAL: usize = 1_000;

    /// How the routable half of a round is stored.
    #[derive(Clone, Copy, PartialEq)]
    enum Round {
        /// A classic queue, transient messages: the broker confirms every
        /// publish at once and acknowledges them together (`multiple`),
        /// after the returns, so lapin hands each return to whichever of
        /// those confirms it resolves first.
        Classic,
        /// A quorum queue, persistent messages, as `P.dead`: routed
        /// publishes are confirmed late and out of order with the returned.
        Quorum,
        /// As `Classic`, with every third publish abandoned by its caller
        /// right after it was sent: its confirm must still be read.
        Abandoned,
    }

    /// Publishes `TOTAL` concurrent mandatory messages, the even ones to a
    /// fresh queue and the odd ones nowhere; returns the wrongly reported.
    async fn round(conn: &Connection, publisher: &Publisher, round: Round) -> Vec<String> {
        let setup = conn.create_channel().await.unwrap();
        let queue = format!(
            "t-returns-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let (options, mut args) = (QueueDeclareOptions::default(), FieldTable::default());
        let options = if round == Round::Quorum {
            let quorum = super::super::topology::str_value("quorum");
            args.insert("x-queue-type".into(), quorum);
            QueueDeclareOptions::durable()
        } else {
            options
        };
        setup
            .queue_declare(queue.as_str().into(), options, args)
            .await
            .unwrap();
        let nowhere = format!("{queue}.nowhere");
        let publishes = (0..TOTAL).map(|i| {
            let key = if i % 2 == 0 { &queue } else { &nowhere };
            let body = i.to_string().into_bytes();
            let mode = if round == Round::Quorum { 2 } else { 1 };
            async move {
                let props = BasicProperties::default().with_delivery_mode(mode);
                let publish = publisher.publish("", key, &body, props, true);
                if round == Round::Abandoned && i % 3 == 0 {
                    // Polled once (so sent), then dropped.
                    let _ = tokio::time::timeout(Duration::ZERO, publish).await;
                    None
                } else {
                    Some(publish.await)
                }
            }
        });
        let results = tokio::time::timeout(Duration::from_secs(60), join_all(publishes)).await;
        let stored = setup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        let results = results.expect("every publish settles within 60 s");
        assert_eq!(
            stored as usize,
            TOTAL / 2,
            "the queue held the routable half"
        );
        results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, r.as_ref()?)))
            .filter(|(i, r)| {
                !matches!(
                    (i % 2, r),
                    (0, Ok(())) | (1, Err(PublishError::Returned(_)))
                )
            })
            .map(|(i, r)| {
                let to = if i % 2 == 0 { "routable" } else { "unroutable" };
                format!("#{i} ({to}): {r:?}")
            })
            .collect()
    }

    #[tokio::test]
    async fn every_return_is_reported_to_its_own_publish() {
        let conn = Connection::connect(
            AMQP_URL,
            ConnectionProperties::default().with_connection_name("test publisher returns".into()),
        )
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672");
        let publisher = Publisher::new(conn.create_channel().await.unwrap())
            .await
            .unwrap();
        for kind in [Round::Classic, Round::Quorum, Round::Abandoned] {
            let wrong = round(&conn, &publisher, kind).await;
            let name = match kind {
                Round::Classic => "classic",
                Round::Quorum => "quorum",
                Round::Abandoned => "abandoned",
            };
            assert!(
                wrong.is_empty(),
                "{name} round: {} of {TOTAL} publishes were credited wrongly, e.g. {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(6)]
            );
        }
        let _ = conn.close(200, "test done".into()).await;
    }
}
