//! One delivered decision as the worker sees it: its body, its history
//! read from our headers, and the ways to settle it. lapin stays behind
//! this type.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lapin::{
    BasicProperties, Channel,
    options::{BasicAckOptions, BasicNackOptions},
    types::FieldTable,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::warn;

use super::{PublishError, Publisher, Topology, headers};
use crate::authn::{HopKey, SignatureHeaders, hop_mac, verify_hop};
use crate::outcome::{OutcomeEvent, rfc3339};

/// Pause before a decision whose publishes failed is handed back, doubled
/// for each earlier delivery of the message up to [`MAX_REQUEUE_PAUSE`]: a
/// publish that keeps failing (a full queue refusing it) must not have its
/// decision re-applied every half second until the delivery limit parks it.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);
const MAX_REQUEUE_PAUSE: Duration = Duration::from_secs(30);

/// Earlier deliveries of a message as the broker counts them: the
/// `x-delivery-count` a quorum queue sets, believed only on a delivery the
/// broker marks redelivered (a publisher may write the header too).
fn broker_count(table: Option<&FieldTable>, redelivered: bool) -> i64 {
    if redelivered {
        headers::get_int(table, headers::DELIVERY_COUNT).unwrap_or(0)
    } else {
        0
    }
}

/// The pause before handing back a message delivered `redeliveries` times
/// before.
fn requeue_pause(redeliveries: i64) -> Duration {
    let doublings = u32::try_from(redeliveries.clamp(0, 16)).unwrap_or(0);
    REQUEUE_PAUSE
        .saturating_mul(1 << doublings)
        .min(MAX_REQUEUE_PAUSE)
}

/// The broker side of one session, shared by its delivery tasks through
/// one `Arc` (not a channel clone per delivery).
pub(crate) struct SessionHandles {
    pub(crate) publisher: Publisher,
    /// Deliveries are settled on the channel that delivered them, directly:
    /// lapin's per-delivery `Acker` routes each ack through an internal
    /// task it spawns, which costs noticeably more on the hot path (see
    /// the README's Performance section).
    pub(crate) consume: Channel,
    pub(crate) topology: Topology,
    /// Named once: every decision publishes here.
    pub(crate) outcomes: String,
    /// Named once: every delivery is checked for having come through it.
    pub(crate) decisions: String,
    /// The longest a retry copy may wait (the retry horizon): RabbitMQ
    /// refuses an expiration above 2^32-1 ms by closing the channel.
    pub(crate) max_delay: Duration,
    /// The longest a publish may wait for its confirm.
    pub(crate) confirm_timeout: Duration,
    /// Signs the state carried on this process's copies, and checks it
    /// on what comes back.
    pub(crate) hop: HopKey,
    /// Cancelled when something this session publishes on failed in a way
    /// only a new session mends (a closed channel, a returned copy, a
    /// confirm that never came): the session ends at once and no task of
    /// it calls a provider any more.
    pub(crate) lost: CancellationToken,
}

impl SessionHandles {
    /// Publishes with a confirm, within the confirm timeout, and counts a
    /// failure under `what`; a failure that only a new session mends ends
    /// this one.
    async fn publish(
        &self,
        what: &'static str,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let publish = self
            .publisher
            .publish(exchange, routing_key, body, properties, mandatory);
        let result = match tokio::time::timeout(self.confirm_timeout, publish).await {
            Ok(result) => result,
            Err(_) => Err(PublishError::TimedOut(self.confirm_timeout)),
        };
        if let Err(e) = &result {
            metrics::counter!("approval_publish_failures_total", "what" => what, "reason" => e.reason())
                .increment(1);
            if e.needs_new_session() && !self.lost.is_cancelled() {
                warn!(error = %e, what, "a publish failed in a way only a new broker session mends; ending the session");
                self.lost.cancel();
            }
        }
        result
    }
}

/// Where a delivery came from (see [`Delivery::origin`]).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub via_decisions_exchange: bool,
    pub routing_key: &'a str,
    pub user_id: Option<&'a str>,
    pub ingress: Option<OffsetDateTime>,
}

/// A human confirmation the decision waits for, carried in its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConfirmation {
    pub token: String,
    pub expires_at: Option<String>,
}

/// History of a decision carried in its headers across deliveries.
#[derive(Debug)]
pub struct History {
    pub received_at: OffsetDateTime,
    pub first_received_at: OffsetDateTime,
    /// Provider calls made in earlier deliveries.
    pub attempts: u32,
    /// Deliveries of this copy beyond the first (quorum queues count them).
    pub delivery_count: i64,
    pub redelivered: bool,
    pub confirmation: Option<PendingConfirmation>,
    /// Whether our hop MAC vouched for the headers above; without it they
    /// are ignored and this is a first receipt.
    pub vouched: bool,
}

impl History {
    /// Our `x-approval-*` headers count only under a valid hop MAC (anyone
    /// may publish into a retry queue or the parking lot, headers and
    /// all), and the delivery count only where the broker marks the
    /// message redelivered (a publisher may set the header too).
    fn read(h: Option<&FieldTable>, redelivered: bool, body: &[u8], hop: &HopKey) -> Self {
        let vouched = headers::get_str(h, headers::HOP)
            .is_some_and(|mac| verify_hop(hop, body, &headers::vouched(h), &mac));
        let delivery_count = broker_count(h, redelivered);
        let h = h.filter(|_| vouched);
        let received_at = OffsetDateTime::now_utc();
        let first_received_at = headers::get_str(h, headers::FIRST_RECEIVED_AT)
            .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
            .unwrap_or(received_at);
        Self {
            received_at,
            first_received_at,
            attempts: headers::get_int(h, headers::ATTEMPTS)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            delivery_count,
            redelivered,
            vouched,
            confirmation: headers::get_str(h, headers::CONFIRMATION_TOKEN).map(|token| {
                PendingConfirmation {
                    token,
                    expires_at: headers::get_str(h, headers::CONFIRMATION_EXPIRES_AT),
                }
            }),
        }
    }

    /// Time since the decision was first received, across deliveries.
    pub fn elapsed(&self) -> Duration {
        (OffsetDateTime::now_utc() - self.first_received_at)
            .try_into()
            .unwrap_or(Duration::ZERO)
    }
}

pub struct Delivery {
    session: Arc<SessionHandles>,
    /// Shared with the session's [`Unsettled`] guard, which settles the
    /// delivery if its task panics.
    held: Arc<Held>,
}

/// The message and whether its task settled it, in one allocation.
struct Held {
    message: lapin::message::Delivery,
    settled: AtomicBool,
}

impl Delivery {
    /// The delivery for its task, and the guard the session keeps.
    pub(crate) fn new(
        session: Arc<SessionHandles>,
        message: lapin::message::Delivery,
    ) -> (Self, Unsettled) {
        let held = Arc::new(Held {
            message,
            settled: AtomicBool::new(false),
        });
        let guard = Unsettled {
            session: session.clone(),
            held: held.clone(),
        };
        (Self { session, held }, guard)
    }

    pub fn body(&self) -> &[u8] {
        &self.held.message.data
    }

    /// Reads the history headers; `received_at` is now.
    pub fn history(&self) -> History {
        let message = &self.held.message;
        History::read(
            message.properties.headers().as_ref(),
            message.redelivered,
            &message.data,
            &self.session.hop,
        )
    }

    /// Upstream's signature headers, as they arrived.
    pub fn signature(&self) -> SignatureHeaders<'_> {
        let h = self.held.message.properties.headers().as_ref();
        let text = |name| match h?.inner().get(name)? {
            lapin::types::AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            lapin::types::AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        };
        SignatureHeaders {
            id: text(headers::WEBHOOK_ID),
            timestamp: text(headers::WEBHOOK_TIMESTAMP),
            signature: text(headers::WEBHOOK_SIGNATURE),
        }
    }

    /// How the message reached the queue: through the decisions exchange
    /// (as upstream publishes), with which routing key and validated
    /// `user_id`, and when the broker stamped it at ingress, if it does.
    pub fn origin(&self) -> Origin<'_> {
        let message = &self.held.message;
        let ingress = headers::get_int(
            message.properties.headers().as_ref(),
            headers::INGRESS_TIMESTAMP,
        )
        .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok());
        Origin {
            via_decisions_exchange: message.exchange.as_str() == self.session.decisions,
            routing_key: message.routing_key.as_str(),
            user_id: message.properties.user_id().as_ref().map(|u| u.as_str()),
            ingress,
        }
    }

    /// Completes when the session this delivery came from is lost: what is
    /// still unsettled is redelivered to the next session, so nothing more
    /// may be done for it here.
    pub fn session_lost(&self) -> WaitForCancellationFuture<'_> {
        self.session.lost.cancelled()
    }

    /// Publishes an outcome event to the outcomes exchange, with a confirm.
    pub async fn publish_outcome(&self, event: &OutcomeEvent) -> Result<(), PublishError> {
        let props = outcome_properties(&event.event_id.to_string(), event.decision_id.as_deref());
        self.session
            .publish(
                "outcome",
                &self.session.outcomes,
                &event.routing_key(),
                &event.to_json(),
                props,
                false,
            )
            .await
    }

    /// Publishes a copy to `P.dead` with the reason in its headers, with a
    /// confirm.
    pub async fn park(
        &self,
        history: &History,
        attempts: u32,
        error_kind: &str,
        error: &str,
    ) -> Result<(), PublishError> {
        let mut h = self.copy_headers(history, attempts, None);
        headers::set_str(&mut h, headers::ERROR_KIND, error_kind);
        headers::set_str(&mut h, headers::ERROR, error);
        let props = headers::copy_properties(&self.held.message.properties, h);
        let dead = self.session.topology.dead();
        self.session
            .publish("park", "", &dead, &self.held.message.data, props, true)
            .await
    }

    /// Publishes a copy to the retry tier that holds `delay`, expiring
    /// after exactly `delay` (between 1 ms and the session's maximum), with
    /// a confirm.
    pub async fn retry_in_tier(
        &self,
        history: &History,
        delay: Duration,
        attempts: u32,
        confirmation: Option<&PendingConfirmation>,
    ) -> Result<(), PublishError> {
        let expiration = expiration_ms(delay, self.session.max_delay);
        let queue = self
            .session
            .topology
            .retry_tier(Duration::from_millis(expiration));
        let h = self.copy_headers(history, attempts, confirmation);
        let props = headers::copy_properties(&self.held.message.properties, h)
            .with_expiration(expiration.to_string().into());
        self.session
            .publish("retry", "", &queue, &self.held.message.data, props, true)
            .await?;
        tracing::debug!(%queue, "scheduled");
        Ok(())
    }

    /// A copy's headers, with our MAC over the state it carries.
    fn copy_headers(
        &self,
        history: &History,
        attempts: u32,
        confirmation: Option<&PendingConfirmation>,
    ) -> FieldTable {
        let message = &self.held.message;
        let original = message.properties.headers().as_ref();
        copy_headers(
            original,
            history,
            attempts,
            confirmation,
            &message.data,
            &self.session.hop,
        )
    }

    /// Acknowledges when everything the decision needed was published;
    /// otherwise hands it back to the queue after a pause. Settling borrows
    /// the delivery, so a task never holds a second, moved copy of it.
    pub async fn acknowledge(&self, published: Result<(), PublishError>) {
        match published {
            Ok(()) => self.ack().await,
            // The connection is closing: the broker hands the decision to
            // the next session, and a nack here would only fail.
            Err(e) if self.session.lost.is_cancelled() => {
                tracing::error!(error = %e, "publishing failed and the broker session is lost; the decision is redelivered to the next session");
                self.held.settled.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::error!(error = %e, "publishing failed; decision not acknowledged and handed back");
                self.requeue().await;
            }
        }
    }

    async fn ack(&self) {
        self.held.settled.store(true, Ordering::Release);
        let tag = self.held.message.delivery_tag;
        if let Err(e) = self
            .session
            .consume
            .basic_ack(tag, BasicAckOptions::default())
            .await
        {
            warn!(error = %e, "ack failed; the decision will be redelivered");
        }
    }

    /// Nack with requeue after [`REQUEUE_PAUSE`], so a failing broker is
    /// not spun on.
    async fn requeue(&self) {
        self.held.settled.store(true, Ordering::Release);
        requeue(&self.session, &self.held.message).await;
    }
}

async fn requeue(session: &SessionHandles, message: &lapin::message::Delivery) {
    // A publisher's copy of the header would hold a prefetch slot for up
    // to 30 s: only the broker's count lengthens the pause.
    let redeliveries = broker_count(message.properties.headers().as_ref(), message.redelivered);
    tokio::time::sleep(requeue_pause(redeliveries)).await;
    let tag = message.delivery_tag;
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = session.consume.basic_nack(tag, requeue).await {
        warn!(error = %e, "nack failed; the broker redelivers on reconnect");
    }
}

/// What the session keeps of a delivery handed to a task, so a task that
/// panics does not leave it unacknowledged, holding a prefetch slot until
/// the connection ends.
pub(crate) struct Unsettled {
    session: Arc<SessionHandles>,
    held: Arc<Held>,
}

impl Unsettled {
    /// The decision's ids as far as its body tells them, for the log line;
    /// unvalidated, so cut short and stripped of control characters.
    pub(crate) fn ids(&self) -> (Option<String>, Option<String>) {
        #[derive(serde::Deserialize)]
        struct Ids {
            decision_id: Option<String>,
            provider: Option<String>,
        }
        let tidy =
            |s: String| -> String { s.chars().filter(|c| !c.is_control()).take(128).collect() };
        serde_json::from_slice::<Ids>(&self.held.message.data)
            .map(|i| (i.decision_id.map(tidy), i.provider.map(tidy)))
            .unwrap_or_default()
    }

    /// Hands the delivery back after the usual pause unless its task
    /// settled it already (a second settle of one tag closes the channel).
    /// The poison check parks a decision one delivery before the broker's
    /// limit, so one that always panics ends parked, not looping.
    pub(crate) async fn requeue(self) {
        if !self.held.settled.swap(true, Ordering::AcqRel) {
            requeue(&self.session, &self.held.message).await;
        }
    }
}

/// A retry copy's `expiration` in milliseconds: at least 1 (0 would expire
/// at once, before the tier's TTL could hold it), at most `max` and below
/// RabbitMQ's own limit.
fn expiration_ms(delay: Duration, max: Duration) -> u64 {
    const BROKER_MAX_MS: u64 = u32::MAX as u64;
    let ms = u64::try_from(delay.min(max).as_millis()).unwrap_or(u64::MAX);
    ms.clamp(1, BROKER_MAX_MS)
}

/// Headers for a new copy of a delivered message: the history the copy
/// carries, set afresh, and of the original's headers only the few worth
/// keeping (`headers::carried`): never its routing headers, its
/// bookkeeping or the broker's delivery history.
fn copy_headers(
    original: Option<&FieldTable>,
    history: &History,
    attempts: u32,
    confirmation: Option<&PendingConfirmation>,
    body: &[u8],
    hop: &HopKey,
) -> FieldTable {
    let mut h = headers::carried(original);
    headers::set_int(&mut h, headers::ATTEMPTS, i64::from(attempts));
    headers::set_str(
        &mut h,
        headers::FIRST_RECEIVED_AT,
        &rfc3339(history.first_received_at),
    );
    if let Some(c) = confirmation {
        headers::set_str(&mut h, headers::CONFIRMATION_TOKEN, &c.token);
        if let Some(at) = &c.expires_at {
            headers::set_str(&mut h, headers::CONFIRMATION_EXPIRES_AT, at);
        }
    }
    let mac = hop_mac(hop, body, &headers::vouched(Some(&h)));
    headers::set_str(&mut h, headers::HOP, &mac);
    h
}

/// The AMQP properties of an outcome event (CONTRACT.md); the bench's
/// ceiling relay sends the same set.
pub fn outcome_properties(event_id: &str, decision_id: Option<&str>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event_id.into())
        .with_app_id("approval-worker".into())
        .with_type("approval.outcome".into())
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
    match decision_id {
        Some(id) => props.with_correlation_id(id.into()),
        None => props,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeue_pauses_grow_with_redeliveries_and_stay_bounded() {
        assert_eq!(requeue_pause(0), Duration::from_millis(500));
        assert_eq!(requeue_pause(1), Duration::from_secs(1));
        assert_eq!(requeue_pause(4), Duration::from_secs(8));
        assert_eq!(requeue_pause(6), MAX_REQUEUE_PAUSE);
        assert_eq!(requeue_pause(i64::MAX), MAX_REQUEUE_PAUSE);
        assert_eq!(requeue_pause(-5), REQUEUE_PAUSE);
    }

    #[test]
    fn expirations_stay_between_one_ms_and_the_maximum() {
        let horizon = Duration::from_secs(1500);
        assert_eq!(expiration_ms(Duration::ZERO, horizon), 1);
        assert_eq!(expiration_ms(Duration::from_millis(2500), horizon), 2500);
        assert_eq!(expiration_ms(Duration::MAX, horizon), 1_500_000);
        assert_eq!(
            expiration_ms(Duration::MAX, Duration::MAX),
            u64::from(u32::MAX)
        );
    }

    #[test]
    fn a_copy_carries_its_history_and_not_the_brokers() {
        let (hop, body) = (HopKey::random(), b"{}".as_slice());
        let mut original = FieldTable::default();
        headers::set_str(&mut original, "x-custom", "left behind");
        headers::set_str(&mut original, "traceparent", "00-abc-def-01");
        headers::set_str(&mut original, headers::WEBHOOK_ID, "msg_1");
        headers::set_int(&mut original, headers::DELIVERY_COUNT, 3);
        let first = History::read(Some(&original), true, body, &hop);
        assert_eq!(first.attempts, 0);
        assert_eq!(first.delivery_count, 3);
        assert!(first.redelivered);
        assert!(!first.vouched);
        assert_eq!(first.first_received_at, first.received_at);

        let pending = PendingConfirmation {
            token: "new".into(),
            expires_at: None,
        };
        let copy = copy_headers(Some(&original), &first, 4, Some(&pending), body, &hop);
        let next = History::read(Some(&copy), false, body, &hop);
        assert!(next.vouched);
        assert_eq!(next.attempts, 4);
        assert_eq!(next.delivery_count, 0);
        assert_eq!(next.first_received_at, first.first_received_at);
        assert_eq!(next.confirmation, Some(pending));
        assert_eq!(headers::get_str(Some(&copy), "x-custom"), None);
        assert_eq!(
            headers::get_str(Some(&copy), "traceparent").as_deref(),
            Some("00-abc-def-01")
        );
        assert_eq!(
            headers::get_str(Some(&copy), headers::WEBHOOK_ID).as_deref(),
            Some("msg_1"),
            "upstream's signature travels with the copy"
        );

        let parked = copy_headers(Some(&copy), &next, 4, None, body, &hop);
        assert_eq!(
            History::read(Some(&parked), false, body, &hop).confirmation,
            None
        );
    }

    /// A publisher can write our headers too: without our MAC they are
    /// ignored, so an injected attempt count cannot park a decision nor a
    /// first receipt in the future switch its retry horizon off.
    #[test]
    fn our_headers_count_only_under_our_mac() {
        let (hop, body) = (HopKey::random(), b"{\"a\":1}".as_slice());
        let mut forged = FieldTable::default();
        headers::set_int(&mut forged, headers::ATTEMPTS, 7);
        headers::set_str(
            &mut forged,
            headers::FIRST_RECEIVED_AT,
            "2999-01-01T00:00:00Z",
        );
        headers::set_str(&mut forged, headers::CONFIRMATION_TOKEN, "tok");
        headers::set_int(&mut forged, headers::DELIVERY_COUNT, 19);
        let read = History::read(Some(&forged), false, body, &hop);
        assert_eq!(
            (
                read.vouched,
                read.attempts,
                read.delivery_count,
                read.confirmation
            ),
            (false, 0, 0, None)
        );
        assert_eq!(read.first_received_at, read.received_at);

        // A MAC made with another key, or over another body, is no MAC.
        let history = History::read(None, false, body, &hop);
        let theirs = copy_headers(None, &history, 7, None, body, &HopKey::random());
        assert!(!History::read(Some(&theirs), false, body, &hop).vouched);
        let ours = copy_headers(None, &history, 7, None, body, &hop);
        assert!(History::read(Some(&ours), false, body, &hop).vouched);
        assert!(!History::read(Some(&ours), false, b"{\"a\":2}", &hop).vouched);
        // Changing a vouched header breaks it.
        let mut edited = ours.clone();
        headers::set_int(&mut edited, headers::ATTEMPTS, 1);
        assert!(!History::read(Some(&edited), false, body, &hop).vouched);
    }
}
