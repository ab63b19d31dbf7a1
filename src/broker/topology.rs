//! Names and declaration of the broker topology (CONTRACT.md section 3,
//! v2). Declaring is idempotent: the same names with the same arguments. An
//! object that exists with other arguments (a v1 deployment) is reported by
//! name with RabbitMQ's reply, never retried blindly: README, "Topology (v2)
//! and migration from v1".

use std::{fmt, time::Duration};

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString},
};

/// Retry tiers: a queue per delay band, so a message never waits behind one
/// with a much longer delay (messages only expire at the head of a queue).
/// The `q` keeps the v2 quorum tiers apart from v1's classic `P.retry.1s`
/// and friends: redeclaring those with quorum arguments would fail, and
/// under new names a v1 deployment upgrades while its old tiers drain by
/// themselves (their dead-letter target is `P.decisions` too).
pub(crate) const RETRY_TIERS: &[(&str, u64)] = &[
    ("q1s", 1_000),
    ("q5s", 5_000),
    ("q30s", 30_000),
    ("q2m", 120_000),
    ("q10m", 600_000),
];

/// v1's classic retry tiers: no longer declared, only deleted with the rest.
const V1_RETRY_TIERS: &[&str] = &["1s", "5s", "30s", "2m", "10m"];

/// `P.dead`'s delivery limit. RabbitMQ 4.0 to 4.2 give every quorum queue a
/// default limit of 20 that counts every return (a `dead-letters list` run
/// returns what it reads), and `P.dead` has no dead-letter target, so the
/// parking lot would be dropped after 20 reads. 4.x reads -1 as unlimited,
/// but 3.x documents no such meaning (3.10.8 accepts -1 without a word, so
/// nothing would warn), so a limit no parked message reaches: the largest
/// value every version and every integer field type accept.
const DEAD_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// How many events `P.outcomes.unrouted` keeps: enough for hours of a
/// missing binding at the worker's usual rate, bounded so a forgotten queue
/// cannot fill the broker's disk. Beyond it the oldest go first.
pub(crate) const UNROUTED_MAX_LENGTH: i64 = 100_000;

/// Where the README explains the v2 topology and the way from v1.
pub const MIGRATION_DOC: &str = "README.md, section \"Topology (v2) and migration from v1\"";

#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Objects exist with other arguments than this version declares
    /// (typically v1's): RabbitMQ refused them with PRECONDITION_FAILED.
    #[error(
        "{} (the broker keeps an object's arguments until it is deleted; see {MIGRATION_DOC})",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Mismatch(Vec<Mismatch>),
    #[error("broker error while declaring the topology: {0}")]
    Broker(#[from] lapin::Error),
}

/// One queue or exchange that exists with other arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// `queue` or `exchange`.
    pub kind: &'static str,
    pub name: String,
    /// RabbitMQ's reply, which names the argument and both values.
    pub reply: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} exists with other arguments: {}",
            self.kind, self.name, self.reply
        )
    }
}

/// One declaration, so every way of declaring walks the same list.
enum Object {
    Exchange {
        name: String,
        kind: ExchangeKind,
        args: FieldTable,
    },
    Queue {
        name: String,
        args: FieldTable,
    },
    Binding {
        queue: String,
        exchange: String,
        key: &'static str,
    },
}

impl Object {
    async fn declare(&self, ch: &Channel) -> Result<(), lapin::Error> {
        match self {
            Object::Exchange { name, kind, args } => {
                let durable = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                ch.exchange_declare(name.as_str().into(), kind.clone(), durable, args.clone())
                    .await
            }
            Object::Queue { name, args } => ch
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions::durable(),
                    args.clone(),
                )
                .await
                .map(drop),
            Object::Binding {
                queue,
                exchange,
                key,
            } => {
                ch.queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
            }
        }
    }

    /// The mismatch `e` reports for this object, if it is one.
    fn mismatch(&self, e: &lapin::Error) -> Option<Mismatch> {
        let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
            return None;
        };
        if *amqp.kind() != AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
            return None;
        }
        let (kind, name) = match self {
            Object::Exchange { name, .. } => ("exchange", name),
            Object::Queue { name, .. } => ("queue", name),
            Object::Binding { .. } => return None,
        };
        Some(Mismatch {
            kind,
            name: name.clone(),
            // The broker is not ours to trust with the operator's terminal.
            reply: amqp
                .get_message()
                .as_str()
                .chars()
                .filter(|c| !c.is_control())
                .collect(),
        })
    }
}

impl Topology {
    pub fn new(prefix: &str, delivery_limit: u32) -> Self {
        Self {
            prefix: prefix.to_owned(),
            delivery_limit,
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Name of both the decisions exchange and the decisions queue.
    pub fn decisions(&self) -> String {
        format!("{}.decisions", self.prefix)
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn outcomes(&self) -> String {
        format!("{}.outcomes", self.prefix)
    }

    /// Name of both the outcomes' alternate exchange and its queue.
    pub fn unrouted(&self) -> String {
        format!("{}.outcomes.unrouted", self.prefix)
    }

    pub(crate) fn retry_queue(&self, tier: &str) -> String {
        format!("{}.retry.{tier}", self.prefix)
    }

    /// Every retry tier's queue, shortest delay first.
    pub fn retry_queues(&self) -> Vec<String> {
        RETRY_TIERS
            .iter()
            .map(|(tier, _)| self.retry_queue(tier))
            .collect()
    }

    /// The queue of the smallest tier that holds `delay`; longer delays
    /// use the last. The message's own expiration sets the exact wait.
    pub(crate) fn retry_tier(&self, delay: Duration) -> String {
        let ms = delay.as_millis();
        let (name, _) = RETRY_TIERS
            .iter()
            .find(|(_, ttl)| u128::from(*ttl) >= ms)
            .unwrap_or(&RETRY_TIERS[RETRY_TIERS.len() - 1]);
        self.retry_queue(name)
    }

    fn decisions_args(&self) -> FieldTable {
        let mut args = quorum_args();
        // 3.10 sets no delivery limit; without one a poison message loops forever.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        dead_letter_at_least_once(&mut args, &self.dead());
        args
    }

    fn dead_args() -> FieldTable {
        let mut args = quorum_args();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DEAD_DELIVERY_LIMIT),
        );
        args
    }

    fn retry_args(&self, ttl_ms: u64) -> FieldTable {
        let mut args = quorum_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(ttl_ms).unwrap_or(i64::MAX)),
        );
        // Straight back to the decisions queue via the default exchange,
        // not through the topic exchange and its other bindings.
        dead_letter_at_least_once(&mut args, &self.decisions());
        args
    }

    fn unrouted_args() -> FieldTable {
        let mut args = quorum_args();
        // The default overflow, drop-head: the newest events are the ones an
        // operator still needs when the queue is full.
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(UNROUTED_MAX_LENGTH),
        );
        args
    }

    fn outcomes_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("alternate-exchange".into(), str_value(&self.unrouted()));
        args
    }

    /// Everything, in an order where each object's dependencies come first
    /// and a v1 deployment's mismatches (the decisions queue, the parking
    /// lot, the outcomes exchange) come in the order an operator migrates
    /// them.
    fn objects(&self) -> Vec<Object> {
        let mut objects = vec![
            Object::Exchange {
                name: self.decisions(),
                kind: ExchangeKind::Topic,
                args: FieldTable::default(),
            },
            Object::Queue {
                name: self.decisions(),
                args: self.decisions_args(),
            },
            Object::Binding {
                queue: self.decisions(),
                exchange: self.decisions(),
                key: "#",
            },
            Object::Queue {
                name: self.dead(),
                args: Self::dead_args(),
            },
        ];
        objects.extend(RETRY_TIERS.iter().map(|(tier, ttl)| Object::Queue {
            name: self.retry_queue(tier),
            args: self.retry_args(*ttl),
        }));
        objects.extend([
            Object::Exchange {
                name: self.unrouted(),
                kind: ExchangeKind::Fanout,
                args: FieldTable::default(),
            },
            Object::Queue {
                name: self.unrouted(),
                args: Self::unrouted_args(),
            },
            Object::Binding {
                queue: self.unrouted(),
                exchange: self.unrouted(),
                key: "",
            },
            Object::Exchange {
                name: self.outcomes(),
                kind: ExchangeKind::Topic,
                args: self.outcomes_args(),
            },
        ]);
        objects
    }

    /// Declares everything on `ch`, stopping at the first failure (which
    /// closes `ch` when the broker refused a declaration).
    pub async fn declare(&self, ch: &Channel) -> Result<(), TopologyError> {
        for object in self.objects() {
            if let Err(e) = object.declare(ch).await {
                return Err(match object.mismatch(&e) {
                    Some(m) => TopologyError::Mismatch(vec![m]),
                    None => e.into(),
                });
            }
        }
        Ok(())
    }

    /// Declares everything, each refused object on its own channel, so one
    /// run names every mismatched object (what `check` reports). Any other
    /// broker error stops at once.
    pub async fn declare_all(&self, conn: &Connection) -> Result<(), TopologyError> {
        let mut ch = conn.create_channel().await?;
        let mut mismatches = Vec::new();
        for object in self.objects() {
            if let Err(e) = object.declare(&ch).await {
                mismatches.push(object.mismatch(&e).ok_or(e)?);
                // The refusal closed the channel.
                ch = conn.create_channel().await?;
            }
        }
        let _ = ch.close(200, "topology declared".into()).await;
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(TopologyError::Mismatch(mismatches))
        }
    }

    /// Removes every queue and exchange of this prefix, v1's retry tiers
    /// included (tests and the demo).
    pub async fn delete(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let mut queues = vec![self.decisions(), self.dead(), self.unrouted()];
        queues.extend(self.retry_queues());
        queues.extend(V1_RETRY_TIERS.iter().map(|t| self.retry_queue(t)));
        for q in queues {
            ch.queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in [self.decisions(), self.outcomes(), self.unrouted()] {
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), str_value("quorum"));
    args
}

/// Dead-lettering to `queue` through the default exchange, held by the
/// source queue until the target confirmed it. RabbitMQ applies
/// at-least-once only together with `reject-publish`; with the default
/// `drop-head` it silently falls back to at-most-once.
fn dead_letter_at_least_once(args: &mut FieldTable, queue: &str) {
    args.insert("x-dead-letter-exchange".into(), str_value(""));
    args.insert("x-dead-letter-routing-key".into(), str_value(queue));
    args.insert("x-dead-letter-strategy".into(), str_value("at-least-once"));
    args.insert("x-overflow".into(), str_value("reject-publish"));
}

pub(crate) fn str_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}
