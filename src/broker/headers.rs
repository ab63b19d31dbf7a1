//! Reading and writing the `x-approval-*` headers that carry a decision's
//! history between deliveries, retries and replicas, and what else a copy
//! the worker republishes (retry, park, replay) may carry.
//!
//! A copy carries our bookkeeping, set afresh, and of the original's
//! headers only [`CARRIED`]: anything more lets a publisher steer the copy
//! (`CC`/`BCC` route it to more queues, so one invalid decision carrying
//! `CC: ["P.decisions"]` is parked back into the decisions queue forever)
//! or grow it past the largest frame the broker accepts, which closes the
//! whole connection.

use crate::authn::webhook::MAX_SIGNATURE_LEN;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};

pub const ATTEMPTS: &str = "x-approval-attempts";
pub const FIRST_RECEIVED_AT: &str = "x-approval-first-received-at";
pub const ERROR_KIND: &str = "x-approval-error-kind";
pub const ERROR: &str = "x-approval-error";
pub const CONFIRMATION_TOKEN: &str = "x-approval-confirmation-token";
pub const CONFIRMATION_EXPIRES_AT: &str = "x-approval-confirmation-expires-at";
/// Names one mandatory publish, so the broker's return of it can be told
/// from the return of another (see the publisher).
pub const PUBLISH_ID: &str = "x-approval-publish-id";
/// Set by quorum queues on redelivery.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// The worker's MAC over its own state on a copy (CONTRACT v2 section 3).
pub const HOP: &str = crate::authn::hop::HEADER;
/// Upstream's signature (CONTRACT v2 section 4.1).
pub const WEBHOOK_ID: &str = crate::authn::webhook::ID_HEADER;
pub const WEBHOOK_TIMESTAMP: &str = crate::authn::webhook::TIMESTAMP_HEADER;
pub const WEBHOOK_SIGNATURE: &str = crate::authn::webhook::SIGNATURE_HEADER;
/// Set by RabbitMQ 3.12+ message interceptors at ingress (milliseconds).
pub const INGRESS_TIMESTAMP: &str = "timestamp_in_ms";

/// W3C trace context, so a retried or parked decision stays in its trace;
/// the first thing a copy sheds when its properties would not fit a frame.
const TRACE: &[&str] = &["traceparent", "tracestate"];

/// The original's headers a copy keeps: trace context and upstream's
/// signature (a copy is verified again at each delivery). Routing headers
/// (`CC`, `BCC`), the broker's `x-*` and anything else a publisher sets
/// are left behind.
pub const CARRIED: &[&str] = &[
    "traceparent",
    "tracestate",
    WEBHOOK_ID,
    WEBHOOK_TIMESTAMP,
    WEBHOOK_SIGNATURE,
];

/// Longest carried value, in bytes: W3C caps `tracestate` at 512
/// characters. A longer value is dropped rather than truncated (a cut
/// trace header is invalid either way). A signature may be longer, up to
/// what the verifier accepts at all, so every signature that passed
/// survives the copy.
pub const MAX_CARRIED_LEN: usize = 512;

/// The headers the hop MAC vouches for: the state a delivery trusts from an
/// earlier one (attempts, first receipt, a pending confirmation) and the
/// signature it was first received with. The error text and kind are
/// informative only (and `fit` may cut the text), so they are not covered.
const VOUCHED: &[&str] = &[
    ATTEMPTS,
    FIRST_RECEIVED_AT,
    CONFIRMATION_TOKEN,
    CONFIRMATION_EXPIRES_AT,
    WEBHOOK_ID,
    WEBHOOK_TIMESTAMP,
    WEBHOOK_SIGNATURE,
];

/// The vouched headers of `table` as the hop MAC takes them: name and
/// canonical text (integers in decimal), other types as their debug text
/// (never equal to what the worker wrote, so they fail the MAC).
pub fn vouched(table: Option<&FieldTable>) -> Vec<(&'static str, String)> {
    let Some(table) = table else {
        return Vec::new();
    };
    VOUCHED
        .iter()
        .filter_map(|name| {
            let value = match table.inner().get(*name)? {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                other => format!("{other:?}"),
            };
            Some((*name, value))
        })
        .collect()
}

/// AMQP 0-9-1's smallest `frame_max` (FRAME_MIN_SIZE). Properties that fit
/// a frame this size fit every connection, whatever it negotiated, so the
/// check needs no connection.
const FRAME_MIN: usize = 4096;

/// A content header frame around its properties: frame type, channel and
/// size (7), class, weight and body size (12), frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// Appended to an error text cut to fit a frame.
const CUT_MARK: &str = "…";

/// Properties that cannot be made to fit one frame even without the
/// original's headers and with the error text cut.
#[derive(Debug, thiserror::Error)]
#[error(
    "message properties take {size} bytes, more than the {limit} a broker frame is sure to hold"
)]
pub struct Oversized {
    size: usize,
    limit: usize,
}

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

/// The original's headers a copy keeps: the [`CARRIED`] ones holding a
/// string of at most [`MAX_CARRIED_LEN`] bytes.
pub fn carried(original: Option<&FieldTable>) -> FieldTable {
    let mut out = FieldTable::default();
    let Some(original) = original else {
        return out;
    };
    for (k, v) in original.inner() {
        let len = match v {
            AMQPValue::LongString(s) => s.as_bytes().len(),
            AMQPValue::ShortString(s) => s.as_str().len(),
            _ => continue,
        };
        let max = if k.as_str() == WEBHOOK_SIGNATURE {
            MAX_SIGNATURE_LEN
        } else {
            MAX_CARRIED_LEN
        };
        if CARRIED.contains(&k.as_str()) && len <= max {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Properties for a new copy of a delivered message, chosen one by one:
/// what reads and identifies the body (content type and encoding, message
/// and correlation ids, timestamp, type, app id), `headers`, persistent.
/// Never `expiration` (a retry-queue TTL must not make a parked or replayed
/// copy expire), `user_id` (the broker checks it against the publishing
/// connection's user), `reply_to` (nothing answers a decision) or
/// `priority` (a publisher must not let its copies overtake others).
pub fn copy_properties(props: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut out = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
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

/// `props` made to fit one frame of any connection: a header frame larger
/// than the connection's `frame_max` makes the broker close the connection,
/// taking every decision in flight on it along. Sheds the trace headers
/// first, then cuts our error text; our other bookkeeping and upstream's
/// signature stay whole, or the publish is refused.
pub fn fit(props: BasicProperties) -> Result<BasicProperties, Oversized> {
    let limit = FRAME_MIN - HEADER_FRAME_OVERHEAD;
    // Without headers, properties are a handful of short strings (at most
    // 255 bytes each): they always fit.
    let Some(table) = props.headers().clone() else {
        return Ok(props);
    };
    let size = encoded_len(&props);
    if size <= limit {
        return Ok(props);
    }
    let mut table = without(&table, TRACE);
    let mut props = props.with_headers(table.clone());
    let size = encoded_len(&props);
    if size <= limit {
        return Ok(props);
    }
    if let Some(error) = get_str(Some(&table), ERROR) {
        let excess = size - limit;
        let mut keep = error.len().saturating_sub(excess + CUT_MARK.len());
        while !error.is_char_boundary(keep) {
            keep -= 1;
        }
        set_str(&mut table, ERROR, &format!("{}{CUT_MARK}", &error[..keep]));
        props = props.with_headers(table);
    }
    let size = encoded_len(&props);
    if size <= limit {
        Ok(props)
    } else {
        Err(Oversized { size, limit })
    }
}

/// Bytes `props` take in a content header frame, flags included, encoded
/// by the same code lapin sends them with.
fn encoded_len(props: &BasicProperties) -> usize {
    lapin::protocol::basic::gen_properties::<Vec<u8>>(props)(Vec::new().into())
        .map_or(usize::MAX, |ctx| ctx.write.len())
}

/// A copy of `table` without `keys` (FieldTable has no remove).
fn without(table: &FieldTable, keys: &[&str]) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in table.inner() {
        if !keys.contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_only_short_trace_context() {
        let mut original = FieldTable::default();
        set_str(
            &mut original,
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        set_str(
            &mut original,
            "tracestate",
            &"x".repeat(MAX_CARRIED_LEN + 1),
        );
        set_str(&mut original, "CC", "approvals.decisions");
        set_str(&mut original, "x-custom", "left behind");
        set_int(&mut original, ATTEMPTS, 7);
        let copy = carried(Some(&original));
        let keys: Vec<&str> = copy.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["traceparent"]);
    }

    #[test]
    fn oversized_properties_shed_what_they_may_or_are_refused() {
        let limit = FRAME_MIN - HEADER_FRAME_OVERHEAD;
        let mut table = FieldTable::default();
        set_str(&mut table, "traceparent", &"t".repeat(500));
        set_str(&mut table, ERROR, "short");
        let fits = BasicProperties::default().with_headers(table.clone());
        assert_eq!(fit(fits.clone()).unwrap(), fits, "what fits is left alone");

        // Two-byte characters: the cut must land on a character boundary.
        set_str(&mut table, ERROR, &"é".repeat(3_000));
        set_int(&mut table, ATTEMPTS, 3);
        let fitted = fit(BasicProperties::default().with_headers(table.clone())).unwrap();
        assert!(encoded_len(&fitted) <= limit, "{}", encoded_len(&fitted));
        let h = fitted.headers().as_ref();
        assert_eq!(get_str(h, "traceparent"), None, "trace headers go first");
        let error = get_str(h, ERROR).unwrap();
        assert!(
            error.starts_with("éé") && error.ends_with(CUT_MARK),
            "{error}"
        );
        assert_eq!(get_int(h, ATTEMPTS), Some(3), "bookkeeping stays whole");

        set_str(&mut table, CONFIRMATION_TOKEN, &"k".repeat(FRAME_MIN));
        assert!(fit(BasicProperties::default().with_headers(table)).is_err());
    }
}
