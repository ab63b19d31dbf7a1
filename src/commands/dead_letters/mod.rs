//! `approval-worker dead-letters`: list parked decisions, and replay them
//! into `P.decisions` with fresh attempt counters.
//!
//! Reading a quorum queue without taking a message off it means handing
//! the message back (a nack or a closed channel), and every hand-back
//! counts as a delivery: on RabbitMQ 4.0 to 4.2, twenty `list` runs would
//! have dropped the whole parking lot at its default delivery limit. So
//! the tools never hand a message back. Each message they leave parked is
//! *kept*: an identical copy is published to the tail of `P.dead` with a
//! confirm, then the original is acknowledged. Walking exactly the number
//! of messages parked when the command started brings every one of them
//! back to where it was, in the same order, never delivered (see
//! [`keep`]). Whatever the worker parks meanwhile goes to the tail too,
//! behind the copies kept so far: the walk never reaches it (it is left
//! for the next run, so a replay whose decisions are parked again at once
//! still ends), and it ends up among the earlier messages, their own order
//! unchanged.
//!
//! A replayed message is acknowledged in `P.dead` only after its republish
//! was confirmed, so interrupting a replay can at worst leave a message in
//! both queues (harmless: the decision's idempotency key and reconciliation
//! absorb the repeat), never in neither. A first SIGINT or SIGTERM stops
//! the walk between two messages, so nothing is in hand; a second one
//! exits at once.

mod parked;

use std::{
    io::Write,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};

use self::parked::Parked;
use crate::{
    broker::{self, PublishError, Publisher, Topology, headers},
    outcome::ErrorKind,
    settings::Settings,
};

#[derive(clap::Subcommand)]
pub enum DeadLetters {
    /// Print parked decisions with their error kind, reason and attempts, without removing them
    /// or counting as a delivery.
    List(Filter),
    /// Move the decisions parked when it starts back to P.decisions with fresh attempt counters
    /// (confirmation_denied only when asked for with --kind).
    Replay(Replay),
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

#[derive(clap::Args, Debug, Default, Clone)]
pub struct Replay {
    #[command(flatten)]
    filter: Filter,
    /// Print what would be replayed and change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    List,
    Replay,
    DryRun,
}

/// What one run did, for the summary line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    /// Listed, replayed, or (dry run) would be replayed.
    chosen: usize,
    /// Left parked: not matching, past the limit, or held back.
    skipped: usize,
    /// Of `skipped`, the `confirmation_denied` ones a replay held back.
    denied: usize,
    /// Parked when the walk started.
    parked_at_start: usize,
    /// Visited before a signal stopped the walk, if one did.
    interrupted_after: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Topology(#[from] crate::broker::TopologyError),
    #[error("republish failed, the message stays parked: {0}")]
    Publish(#[from] PublishError),
    #[error("could not write the listing: {0}")]
    Output(#[from] std::io::Error),
}

pub async fn run(settings: Settings, cmd: DeadLetters) -> ExitCode {
    let (filter, mode) = match cmd {
        DeadLetters::List(filter) => (filter, Mode::List),
        DeadLetters::Replay(Replay { filter, dry_run }) => {
            (filter, if dry_run { Mode::DryRun } else { Mode::Replay })
        }
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
    let mut counts = Counts::default();
    let stop = match stop_on_signal() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("dead-letters: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = async {
        let channel = conn.create_channel().await?;
        topology.declare(&channel).await?;
        // Keeping publishes one copy at a time on this channel and waits
        // for its confirm, so a return it carries can only be that copy's.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let publisher = if mode == Mode::Replay {
            Some(Publisher::new(conn.create_channel().await?).await?)
        } else {
            None
        };
        let mut out = std::io::stdout();
        let walk = Walk {
            channel: &channel,
            topology: &topology,
            filter: &filter,
            mode,
            replay_to: publisher.as_ref(),
            stop: &stop,
        };
        let walked = walk.run(&mut out, &mut counts).await;
        // Closing the channel first waits until the broker has handled
        // every acknowledgement sent on it. Closing only the connection
        // lets a busy broker end the channel with the last acks still
        // queued, which hands back originals whose kept copies were
        // already confirmed: duplicates, each counted as a delivery.
        let closed = channel.close(200, "dead-letters done".into()).await;
        walked?;
        closed?;
        Ok::<_, DeadLetterError>(())
    }
    .await;
    let _ = conn.close(200, "dead-letters done".into()).await;
    eprintln!("{}", summary(mode, &counts, &topology));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dead-letters: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The last line, on stderr so that stdout holds only parked messages.
fn summary(mode: Mode, counts: &Counts, topology: &Topology) -> String {
    let Counts {
        chosen,
        skipped,
        denied,
        parked_at_start,
        interrupted_after,
    } = counts;
    let done = match mode {
        Mode::List => format!("{chosen} decision(s) listed, left in {}", topology.dead()),
        Mode::Replay => format!("{chosen} decision(s) replayed to {}", topology.decisions()),
        Mode::DryRun => format!(
            "{chosen} decision(s) would be replayed to {} (dry run: nothing changed)",
            topology.decisions()
        ),
    };
    let mut line = format!("{done}; {skipped} skipped, kept in {}", topology.dead());
    if *denied > 0 {
        line.push_str(&format!(
            " ({denied} {kind}: a person said no; replay them with --kind {kind})",
            kind = ErrorKind::ConfirmationDenied.as_str()
        ));
    }
    if let Some(visited) = interrupted_after {
        line.push_str(&format!(
            "; interrupted after {visited} of {parked_at_start}: \
             those kept now wait behind the others, none was lost"
        ));
    }
    line
}

/// Set by the first SIGINT or SIGTERM; the second exits at once (130, as a
/// shell reports an interrupted command), for a broker that stopped
/// answering in the middle of a message.
fn stop_on_signal() -> std::io::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        for _ in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if flag.swap(true, Ordering::AcqRel) {
                eprintln!(
                    "dead-letters: stopped at once; a message in hand goes back to the parking lot"
                );
                std::process::exit(130);
            }
            eprintln!("dead-letters: stopping after this message (again to stop at once)");
        }
    });
    Ok(stop)
}

/// One pass over the parking lot.
struct Walk<'a> {
    /// Confirm mode: gets, acknowledges and keeps.
    channel: &'a Channel,
    topology: &'a Topology,
    filter: &'a Filter,
    mode: Mode,
    /// Set for a replay that is not a dry run.
    replay_to: Option<&'a Publisher>,
    /// Asks the walk to stop before its next message.
    stop: &'a AtomicBool,
}

impl Walk<'_> {
    /// Visits each message parked when it starts, once, one at a time
    /// (memory does not grow with the parking lot): a chosen one is
    /// printed and kept, or replayed; any other is kept. Stops early only
    /// when the queue runs dry (someone else took messages) or on an error.
    async fn run(&self, out: &mut impl Write, counts: &mut Counts) -> Result<(), DeadLetterError> {
        let dead = self.topology.dead();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let parked_at_start = self
            .channel
            .queue_declare(dead.as_str().into(), passive, FieldTable::default())
            .await?
            .message_count();
        counts.parked_at_start = usize::try_from(parked_at_start).unwrap_or(usize::MAX);
        for visited in 0..counts.parked_at_start {
            if self.stop.load(Ordering::Acquire) {
                counts.interrupted_after = Some(visited);
                break;
            }
            let Some(msg) = self
                .channel
                .basic_get(dead.as_str().into(), BasicGetOptions::default())
                .await?
            else {
                break;
            };
            let delivery = &msg.delivery;
            match self.visit(delivery, counts).await {
                // Printed once settled: a line on the terminal means done.
                Ok(Some(line)) => {
                    if let Err(e) = writeln!(out, "{line}") {
                        // The reader went away (`| head`): no point going on.
                        counts.interrupted_after = Some(visited + 1);
                        return Err(e.into());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    // Handing it back counts one delivery; better than
                    // keeping a copy we could not confirm.
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    let _ = self
                        .channel
                        .basic_nack(delivery.delivery_tag, requeue)
                        .await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Settles one message, kept or replayed; gives its line when chosen.
    async fn visit(
        &self,
        delivery: &Delivery,
        counts: &mut Counts,
    ) -> Result<Option<String>, DeadLetterError> {
        let parked = Parked::read(delivery);
        let held_back = self.mode != Mode::List && self.holds_back(&parked);
        let chosen = self.filter.matches(&parked)
            && !held_back
            && self.filter.limit.is_none_or(|l| counts.chosen < l);
        if !chosen {
            keep(self.channel, &self.topology.dead(), delivery).await?;
            counts.skipped += 1;
            if held_back && self.filter.matches(&parked) {
                counts.denied += 1;
            }
            return Ok(None);
        }
        match self.replay_to {
            Some(publisher) => {
                let props = fresh_properties(&delivery.properties);
                publisher
                    .publish("", &self.topology.decisions(), &delivery.data, props, true)
                    .await?;
                self.channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
            }
            None => keep(self.channel, &self.topology.dead(), delivery).await?,
        }
        counts.chosen += 1;
        Ok(Some(parked.line()))
    }

    /// A `confirmation_denied` decision is one a person refused: replaying
    /// it would ask them again, so only an explicit `--kind` does.
    fn holds_back(&self, parked: &Parked) -> bool {
        let denied = ErrorKind::ConfirmationDenied.as_str();
        parked.kind == denied && self.filter.kind.as_deref() != Some(denied)
    }
}

impl Filter {
    fn matches(&self, p: &Parked) -> bool {
        self.provider
            .as_ref()
            .is_none_or(|want| p.provider.as_ref() == Some(want))
            && self.kind.as_ref().is_none_or(|want| &p.kind == want)
    }
}

/// Puts `delivery` back at the tail of the parking lot without counting a
/// delivery: an identical copy, confirmed, then the original acknowledged.
///
/// A crash between the confirm and the ack leaves both (the broker hands
/// the original back when the connection drops): a duplicate in the
/// parking lot, harmless, and the opposite order could lose the message.
/// The copy is published alone and awaited before the next one, so the
/// broker's return of it, if any, comes with its own confirm.
async fn keep(channel: &Channel, dead: &str, delivery: &Delivery) -> Result<(), DeadLetterError> {
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirmation = channel
        .basic_publish(
            "".into(),
            dead.into(),
            mandatory,
            &delivery.data,
            identical_properties(&delivery.properties),
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(returned)) => {
            let reply = returned.reply_text.as_str().to_owned();
            return Err(PublishError::Returned(reply).into());
        }
        Confirmation::Nack(_) => return Err(PublishError::Nacked.into()),
        Confirmation::NotRequested => return Err(PublishError::Unconfirmed.into()),
    }
    channel
        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
        .await?;
    Ok(())
}

/// Headers quorum queues set on a message handed back before: 3.x counts
/// every return in `x-delivery-count`, 4.x also `x-acquired-count`.
const BROKER_COUNTS: &[&str] = &[headers::DELIVERY_COUNT, "x-acquired-count"];

/// The original's properties for its kept copy: all of them, headers
/// included (the parking reason, the broker's `x-death`), except
/// `user_id`, which the broker checks against the publishing connection's
/// user and would refuse by closing the channel (a message the broker
/// dead-lettered itself keeps its publisher's), and [`BROKER_COUNTS`],
/// the broker's counts of the original's deliveries: the copy has had
/// none. The copy fits a frame: the broker just sent the same properties
/// on this connection.
fn identical_properties(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(h) = p.headers() {
        let mut kept = FieldTable::default();
        for (k, v) in h.inner() {
            if !BROKER_COUNTS.contains(&k.as_str()) {
                kept.insert(k.clone(), v.clone());
            }
        }
        out = out.with_headers(kept);
    }
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.expiration() {
        out = out.with_expiration(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// The original properties without any attempt history or parking reason.
fn fresh_properties(props: &BasicProperties) -> BasicProperties {
    headers::copy_properties(props, headers::carried(props.headers().as_ref()))
}

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;

    #[test]
    fn a_kept_copy_is_the_original_without_user_id_or_delivery_count() {
        let mut h = FieldTable::default();
        headers::set_str(&mut h, headers::ERROR_KIND, "exhausted");
        headers::set_str(&mut h, "x-first-death-reason", "delivery_limit");
        headers::set_int(&mut h, headers::DELIVERY_COUNT, 4);
        headers::set_int(&mut h, "x-acquired-count", 5);
        let original = BasicProperties::default()
            .with_headers(h)
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id("m".into())
            .with_correlation_id("c".into())
            .with_timestamp(7)
            .with_type("t".into())
            .with_app_id("a".into())
            .with_user_id("upstream".into())
            .with_expiration("60000".into());
        let copy = identical_properties(&original);
        assert_eq!(*copy.user_id(), None);
        let h = copy.headers().as_ref();
        assert_eq!(headers::get_int(h, headers::DELIVERY_COUNT), None);
        assert_eq!(headers::get_int(h, "x-acquired-count"), None);
        assert_eq!(
            headers::get_str(h, "x-first-death-reason").as_deref(),
            Some("delivery_limit")
        );
        // Everything else is the original's.
        let mut expected = FieldTable::default();
        for (k, v) in original.headers().as_ref().unwrap().inner() {
            if !BROKER_COUNTS.contains(&k.as_str()) {
                expected.insert(k.clone(), v.clone());
            }
        }
        let rebuilt = original.clone().with_headers(expected);
        let without_user = copy.with_user_id("upstream".into());
        assert_eq!(without_user, rebuilt);
        assert!(matches!(
            rebuilt
                .headers()
                .as_ref()
                .unwrap()
                .inner()
                .get(headers::ERROR_KIND),
            Some(AMQPValue::LongString(_))
        ));
    }

    #[test]
    fn the_summary_names_what_a_replay_held_back() {
        let topology = Topology::new("p", 20);
        let counts = Counts {
            chosen: 2,
            skipped: 3,
            denied: 1,
            ..Counts::default()
        };
        let line = summary(Mode::Replay, &counts, &topology);
        assert_eq!(
            line,
            "2 decision(s) replayed to p.decisions; 3 skipped, kept in p.dead \
             (1 confirmation_denied: a person said no; replay them with --kind confirmation_denied)"
        );
        let line = summary(Mode::DryRun, &Counts::default(), &topology);
        assert!(line.contains("would be replayed") && line.contains("nothing changed"));
        let counts = Counts {
            chosen: 4,
            parked_at_start: 10,
            interrupted_after: Some(4),
            ..Counts::default()
        };
        let line = summary(Mode::List, &counts, &topology);
        assert!(line.contains("interrupted after 4 of 10"), "{line}");
    }
}
