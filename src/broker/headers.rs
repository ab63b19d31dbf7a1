//! Reading and writing the `x-approval-*` headers that carry a decision's
//! history between deliveries, retries and replicas.

use lapin::types::{AMQPValue, FieldTable};

pub const ATTEMPTS: &str = "x-approval-attempts";
pub const FIRST_RECEIVED_AT: &str = "x-approval-first-received-at";
pub const ERROR_KIND: &str = "x-approval-error-kind";
pub const ERROR: &str = "x-approval-error";
pub const CONFIRMATION_TOKEN: &str = "x-approval-confirmation-token";
pub const CONFIRMATION_EXPIRES_AT: &str = "x-approval-confirmation-expires-at";
/// Set by quorum queues on redelivery.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

pub fn get_int(table: Option<&FieldTable>, key: &str) -> Option<i64> {
    match table?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

pub fn get_str(table: Option<&FieldTable>, key: &str) -> Option<String> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(key.into(), super::topology::str_value(value));
}

pub fn set_int(table: &mut FieldTable, key: &str, value: i64) {
    table.insert(key.into(), AMQPValue::LongLongInt(value));
}

/// A copy of `table` without `keys` (FieldTable has no remove).
pub fn without(table: Option<&FieldTable>, keys: &[&str]) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(t) = table {
        for (k, v) in t.inner() {
            if !keys.contains(&k.as_str()) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Properties for a new copy of a delivered message: the original's, with
/// `headers` replaced, persistent, and without `expiration` (a retry-queue
/// TTL must never make a parked or replayed copy expire) or `user_id`
/// (the broker checks it against the publishing connection's user).
pub fn copy_properties(
    props: &lapin::BasicProperties,
    headers: FieldTable,
) -> lapin::BasicProperties {
    let mut out = lapin::BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = props.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

/// Header keys that describe a message's past and must not travel into a
/// new copy of it.
pub const HISTORY: &[&str] = &[
    ATTEMPTS,
    FIRST_RECEIVED_AT,
    ERROR,
    ERROR_KIND,
    CONFIRMATION_TOKEN,
    CONFIRMATION_EXPIRES_AT,
    DELIVERY_COUNT,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];
