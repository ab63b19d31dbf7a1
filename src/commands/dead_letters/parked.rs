//! One parked message as the tools read and print it. Everything printed
//! comes from a message anybody with write access to the broker could have
//! shaped, so it reaches the operator's terminal escaped.

use std::fmt::Write;

use lapin::message::Delivery;
use serde_json::Value;

use crate::broker::headers;

/// What the listing shows of one parked message.
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) decision_id: Option<String>,
    pub(super) provider: Option<String>,
    pub(super) action: Option<String>,
    pub(super) kind: String,
    pub(super) reason: String,
    pub(super) attempts: i64,
    pub(super) first_received_at: Option<String>,
}

impl Parked {
    pub(super) fn read(delivery: &Delivery) -> Self {
        let h = delivery.properties.headers().as_ref();
        let body: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
        // Messages the broker dead-lettered itself (delivery limit) have no
        // x-approval headers; their reason is in x-first-death-reason.
        let broker_reason = headers::get_str(h, "x-first-death-reason");
        Self {
            decision_id: field("decision_id"),
            provider: field("provider"),
            action: field("action"),
            kind: headers::get_str(h, headers::ERROR_KIND)
                .or_else(|| broker_reason.clone())
                .unwrap_or_else(|| "unknown".to_owned()),
            reason: headers::get_str(h, headers::ERROR)
                .or_else(|| broker_reason.map(|r| format!("dead-lettered by the broker: {r}")))
                .unwrap_or_default(),
            attempts: headers::get_int(h, headers::ATTEMPTS).unwrap_or(0),
            first_received_at: headers::get_str(h, headers::FIRST_RECEIVED_AT),
        }
    }

    /// One line, tab-separated: id, provider, action, then `key=value`
    /// columns. No value can end the line, add a column or reach the
    /// terminal as a control sequence.
    pub(super) fn line(&self) -> String {
        let or_dash = |v: &Option<String>| escape(v.as_deref().unwrap_or("-"));
        format!(
            "{}\t{}\t{}\tkind={}\tattempts={}\tfirst_received_at={}\treason={}",
            or_dash(&self.decision_id),
            or_dash(&self.provider),
            or_dash(&self.action),
            escape(&self.kind),
            self.attempts,
            or_dash(&self.first_received_at),
            escape(&self.reason),
        )
    }
}

/// `s` with every character a terminal could act on written as a Rust
/// escape: control characters (C0 with tab, CR and LF, DEL, and the C1
/// range, whose U+009B is a one-character CSI on many terminals) and the
/// invisible formatting characters that reorder or hide text (bidi
/// overrides and isolates, zero-width characters). A backslash is doubled,
/// so an escape in the output always means one in the message.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '\n' => out.push_str(r"\n"),
            '\r' => out.push_str(r"\r"),
            '\t' => out.push_str(r"\t"),
            c if c.is_control() || is_invisible_format(c) => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// Unicode format characters that change how the text around them is
/// shown: bidi marks, embeddings, overrides and isolates, zero-width
/// spaces and joiners, the byte order mark.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(escape("plain id-1 é €"), "plain id-1 é €");
        assert_eq!(
            escape("a\u{1b}[2J\u{1b}]0;title\u{7}b"),
            r"a\u{1b}[2J\u{1b}]0;title\u{7}b"
        );
        assert_eq!(escape("x\r\ny\tz"), r"x\r\ny\tz");
        assert_eq!(escape("\u{0}\u{7f}\u{9b}31m"), r"\u{0}\u{7f}\u{9b}31m");
        assert_eq!(
            escape("pay\u{202e}txt.exe\u{200b}"),
            r"pay\u{202e}txt.exe\u{200b}"
        );
        assert_eq!(escape(r"already\n"), r"already\\n", "no forged escapes");
    }

    #[test]
    fn a_line_stays_one_line_with_its_columns() {
        let parked = Parked {
            decision_id: Some("d\u{1b}[31m\n".into()),
            provider: None,
            action: Some("reject\tforged".into()),
            kind: "invalid\r".into(),
            reason: "line one\nline two".into(),
            attempts: 2,
            first_received_at: None,
        };
        let line = parked.line();
        assert_eq!(
            line,
            "d\\u{1b}[31m\\n\t-\treject\\tforged\tkind=invalid\\r\tattempts=2\t\
             first_received_at=-\treason=line one\\nline two"
        );
        assert_eq!(line.split('\t').count(), 7);
        assert!(!line.chars().any(|c| c.is_control() && c != '\t'));
    }
}
