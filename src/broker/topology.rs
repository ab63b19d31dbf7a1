//! Names and declaration of the broker topology (CONTRACT.md section 3).
//! Declaring is idempotent: the same names with the same arguments.

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};

/// Retry tiers: a queue per delay band, so a message never waits behind one
/// with a much longer delay (messages only expire at the head of a queue).
pub(crate) const RETRY_TIERS: &[(&str, u64)] = &[
    ("1s", 1_000),
    ("5s", 5_000),
    ("30s", 30_000),
    ("2m", 120_000),
    ("10m", 600_000),
];

#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
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

    pub(crate) fn retry_queue(&self, tier: &str) -> String {
        format!("{}.retry.{tier}", self.prefix)
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
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), str_value("quorum"));
        // 3.10 sets no delivery limit; without one a poison message loops forever.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert("x-dead-letter-exchange".into(), str_value(""));
        args.insert("x-dead-letter-routing-key".into(), str_value(&self.dead()));
        args
    }

    pub async fn declare(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            self.decisions().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.outcomes().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            self.decisions().into(),
            QueueDeclareOptions::durable(),
            self.decisions_args(),
        )
        .await?;
        ch.queue_bind(
            self.decisions().into(),
            self.decisions().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), str_value("quorum"));
        ch.queue_declare(
            self.dead().into(),
            QueueDeclareOptions::durable(),
            dead_args,
        )
        .await?;
        for (tier, ttl) in RETRY_TIERS {
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(*ttl as i64));
            // Straight back to the decisions queue via the default exchange,
            // not through the topic exchange and its other bindings.
            args.insert("x-dead-letter-exchange".into(), str_value(""));
            args.insert(
                "x-dead-letter-routing-key".into(),
                str_value(&self.decisions()),
            );
            ch.queue_declare(
                self.retry_queue(tier).into(),
                QueueDeclareOptions::durable(),
                args,
            )
            .await?;
        }
        Ok(())
    }

    /// Removes every queue and exchange of this prefix (tests and the demo).
    pub async fn delete(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let mut queues = vec![self.decisions(), self.dead()];
        queues.extend(RETRY_TIERS.iter().map(|(t, _)| self.retry_queue(t)));
        for q in queues {
            ch.queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in [self.decisions(), self.outcomes()] {
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

pub(crate) fn str_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}
