//! The v2 topology of CONTRACT.md section 3 on the real broker: quorum retry
//! tiers that honour a copy's own expiration and dead-letter at least once,
//! the outcomes' alternate exchange, a v1 deployment named by `check`
//! instead of crash-looping, and `check`'s publish-permission probe.
//! Every test works in its own prefix (and RabbitMQ user), removed by a
//! guard even when the test fails.

use std::{process::Stdio, time::Duration};

use approval_worker::broker::Topology;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};

use crate::helpers::{
    broker::{AMQP_URL, DELIVERY_LIMIT},
    signing,
    wait::{DEADLINE, wait_for},
    worker::Process,
};

/// A prefix of the test's own, and whatever else it creates on the broker
/// (users, policies): all removed on drop, on panic too.
struct Namespace {
    prefix: String,
    topology: Topology,
    users: Vec<String>,
    policies: Vec<String>,
}

impl Namespace {
    fn new(name: &str) -> Self {
        let prefix = format!(
            "t-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            topology: Topology::new(&prefix, DELIVERY_LIMIT),
            prefix,
            users: Vec::new(),
            policies: Vec::new(),
        }
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// A RabbitMQ user with these permissions on `/`; returns its URL.
    fn user(&mut self, configure: &str, write: &str, read: &str) -> String {
        let user = format!("{}-{}", self.prefix, self.users.len());
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &user, &password]);
        self.users.push(user.clone());
        rabbitmqctl(&["set_permissions", "-p", "/", &user, configure, write, read]);
        format!("amqp://{user}:{password}@127.0.0.1:5672/%2f")
    }

    /// `approval-worker check` on this prefix, as the broker user of `url`.
    async fn check(&self, url: &str) -> (Option<i32>, String) {
        let keys = signing::trusted_keys();
        let env = [
            ("APPROVAL_AMQP__URL", url),
            ("APPROVAL_AMQP__PREFIX", &self.prefix),
            ("APPROVAL_AUTH__KEYS", &keys),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let mut check = Process::spawn(&["check"], &env);
        let status = check.wait(DEADLINE).await;
        (status.code(), check.output())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for policy in &self.policies {
            rabbitmqctl(&["clear_policy", "-p", "/", policy]);
        }
        for user in &self.users {
            rabbitmqctl(&["delete_user", user]);
        }
        let topology = self.topology.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(conn) = connect().await {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = topology.delete(&ch).await;
                    }
                    let _ = conn.close(200, "test cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

async fn connect() -> Result<Connection, lapin::Error> {
    Connection::connect(
        AMQP_URL,
        ConnectionProperties::default().with_connection_name("test topology".into()),
    )
    .await
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Ready messages in `queue`.
async fn ready(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// The topology exactly as v1 declared it (before issue 12): classic retry
/// tiers `P.retry.<tier>`, and no at-least-once, parking-lot limit or
/// alternate exchange.
async fn declare_v1(ch: &Channel, ns: &Namespace) {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for x in ["decisions", "outcomes"] {
        ch.exchange_declare(
            ns.name(x).into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(DELIVERY_LIMIT)),
    );
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(&ns.name("dead")));
    ch.queue_declare(
        ns.name("decisions").into(),
        QueueDeclareOptions::durable(),
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        ns.name("decisions").into(),
        ns.name("decisions").into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    ch.queue_declare(ns.name("dead").into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    for (tier, ttl) in [
        ("1s", 1_000),
        ("5s", 5_000),
        ("30s", 30_000),
        ("2m", 120_000),
        ("10m", 600_000),
    ] {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&ns.name("decisions")),
        );
        ch.queue_declare(
            ns.name(&format!("retry.{tier}")).into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    }
}

/// A v1 deployment does not crash-loop `check`: it exits non-zero naming
/// each object that exists with other arguments, with RabbitMQ's reply
/// (which names the argument), and points at the README's migration.
#[tokio::test]
async fn check_names_each_v1_object_that_mismatches_and_points_at_the_migration() {
    let ns = Namespace::new("topo-v1");
    let conn = connect().await.unwrap();
    declare_v1(&conn.create_channel().await.unwrap(), &ns).await;

    let (code, out) = ns.check(AMQP_URL).await;
    assert_eq!(code, Some(1), "check fails on a v1 topology:\n{out}");
    for (kind, name, argument) in [
        ("queue", ns.name("decisions"), "x-dead-letter-strategy"),
        ("queue", ns.name("dead"), "x-delivery-limit"),
        ("exchange", ns.name("outcomes"), "alternate-exchange"),
    ] {
        let named = format!("{kind} {name} exists with other arguments");
        let line = out
            .lines()
            .find(|l| l.contains("check failed:"))
            .unwrap_or_default();
        assert!(line.contains(&named), "{named} in:\n{out}");
        assert!(line.contains(argument), "{argument} in:\n{out}");
    }
    assert!(
        out.contains("Topology (v2) and migration from v1"),
        "the README pointer in:\n{out}"
    );
    // The v1 retry tiers are left alone: they drain into the decisions queue.
    assert!(!out.contains(&ns.name("retry.")), "{out}");

    // The library reports the same to the worker's session.
    let err = ns
        .topology
        .declare(&conn.create_channel().await.unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("queue {} exists", ns.name("decisions"))),
        "{err}"
    );
    let _ = conn.close(200, "done".into()).await;
}

/// Declaring is idempotent: twice on one channel, then `check` over it.
#[tokio::test]
async fn declaring_the_topology_twice_changes_nothing() {
    let ns = Namespace::new("topo-twice");
    let conn = connect().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ns.topology.declare(&ch).await.unwrap();
    ns.topology.declare(&ch).await.unwrap();
    let (code, out) = ns.check(AMQP_URL).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("publishing allowed"), "{out}");
    let _ = conn.close(200, "done".into()).await;
}

/// An outcome no binding takes is kept in `P.outcomes.unrouted`, confirmed.
#[tokio::test]
async fn an_outcome_no_binding_takes_is_kept_in_the_unrouted_queue() {
    let ns = Namespace::new("topo-unrouted");
    let conn = connect().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ns.topology.declare(&ch).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            ns.name("outcomes").into(),
            "nobody.binds_this".into(),
            BasicPublishOptions::default(),
            br#"{"status":"applied"}"#,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let unrouted = ns.name("outcomes.unrouted");
    let check = conn.create_channel().await.unwrap();
    wait_for("the event in the unrouted queue", DEADLINE, || async {
        (ready(&check, &unrouted).await == 1).then_some(())
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
}

/// A copy in the longest tier (10 minutes) with its own 300 ms expiration
/// comes back to the decisions queue at once: the quorum tier honours the
/// per-message TTL (RabbitMQ 3.10 or later) and dead-letters to
/// `P.decisions` through the default exchange.
#[tokio::test]
async fn a_retry_copy_waits_only_its_own_expiration_then_returns_to_the_decisions_queue() {
    let ns = Namespace::new("topo-ttl");
    let conn = connect().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ns.topology.declare(&ch).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            ns.name("retry.q10m").into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"{}",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_expiration("300".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "routed to the tier"
    );
    let decisions = ns.name("decisions");
    wait_for(
        "the copy back in the decisions queue",
        Duration::from_secs(10),
        || async { (ready(&ch, &decisions).await == 1).then_some(()) },
    )
    .await;
    let _ = conn.close(200, "done".into()).await;
}

/// `check` publishes nowhere yet proves the worker may publish everywhere it
/// must: the README's permission set passes, a user without write on the
/// default exchange (parked and retried copies) or on `P.outcomes` fails
/// naming it, and none of the probes left a message anywhere.
#[tokio::test]
async fn check_names_where_the_worker_user_may_not_publish_and_delivers_nothing() {
    let mut ns = Namespace::new("topo-perm");
    let p = ns.prefix.clone();
    let (configure, read) = (format!("^{p}\\."), format!("^{p}\\."));
    let documented = ns.user(&configure, &format!("^({p}\\..*|amq\\.default)$"), &read);
    let (code, out) = ns.check(&documented).await;
    assert_eq!(code, Some(0), "the README's permissions suffice:\n{out}");

    let no_default = ns.user(&configure, &format!("^{p}\\..*$"), &read);
    let (code, out) = ns.check(&no_default).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("may not publish to the default exchange (amq.default)")
            && out.contains("ACCESS_REFUSED"),
        "{out}"
    );

    let no_outcomes = ns.user(
        &configure,
        &format!("^({p}\\.(decisions|dead|retry\\..*|outcomes\\.unrouted)|amq\\.default)$"),
        &read,
    );
    let (code, out) = ns.check(&no_outcomes).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("may not publish to exchange {p}.outcomes:"))
            && out.contains("ACCESS_REFUSED"),
        "{out}"
    );

    let conn = connect().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut queues = vec![ns.name("dead"), ns.name("outcomes.unrouted")];
    queues.extend(ns.topology.retry_queues());
    for q in queues {
        assert_eq!(ready(&ch, &q).await, 0, "no probe delivered to {q}");
    }
    let _ = conn.close(200, "done".into()).await;
}

/// The tiers dead-letter at least once: a copy that expires while the
/// decisions queue is gone (a migration, an outage) stays with its tier and
/// reaches the queue once it is back. (v1's classic tiers dropped it.)
/// RabbitMQ retries such a dead-letter every
/// `dead_letter_worker_publisher_confirm_timeout` (3 minutes by default) or
/// at once when the tier's policy changes: the test changes it.
#[tokio::test]
async fn a_retry_copy_expiring_while_the_decisions_queue_is_gone_is_kept_until_it_is_back() {
    let mut ns = Namespace::new("topo-alo");
    let conn = connect().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ns.topology.declare(&ch).await.unwrap();
    let (tier, decisions) = (ns.name("retry.q1s"), ns.name("decisions"));
    ch.queue_delete(decisions.as_str().into(), Default::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        tier.as_str().into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_expiration("100".into()),
    )
    .await
    .unwrap();
    wait_for("the copy to expire", DEADLINE, || async {
        (ready(&ch, &tier).await == 0).then_some(())
    })
    .await;
    ns.topology.declare(&ch).await.unwrap();
    let policy = format!("{}-nudge", ns.prefix);
    ns.policies.push(policy.clone());
    assert!(rabbitmqctl(&[
        "set_policy",
        "-p",
        "/",
        "--apply-to",
        "queues",
        &policy,
        &format!("^{}$", tier.replace('.', "\\.")),
        r#"{"max-length-bytes":1000000000}"#,
    ]));
    wait_for("the kept copy in the decisions queue", DEADLINE, || async {
        (ready(&ch, &decisions).await == 1).then_some(())
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
}
