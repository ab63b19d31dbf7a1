//! Qonto's strong customer authentication on approve, as a state machine
//! apart from HTTP: which requests need it, the sessions opened for them and
//! how each resolves (a rule standing in for the human, the sandbox's mock
//! endpoint, or the documented expiry). `mod.rs` renders it on Qonto's wire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::tools::sim::kit::{ScaAuto, random_hex};

/// Qonto SCA sessions last 15 minutes, then read as `deny`.
pub(super) const LIFETIME: Duration = Duration::from_secs(15 * 60);

struct Session {
    request_id: String,
    started: Instant,
    auto: ScaAuto,
    /// Set by the sandbox mock endpoint; wins over the auto rule.
    decided: Option<&'static str>,
}

impl Session {
    fn result(&self) -> &'static str {
        if let Some(result) = self.decided {
            return result;
        }
        let elapsed = self.started.elapsed();
        match self.auto {
            ScaAuto::Allow { after } if elapsed >= after => return "allow",
            ScaAuto::Deny { after } if elapsed >= after => return "deny",
            _ => {}
        }
        if elapsed >= LIFETIME {
            "deny"
        } else {
            "waiting"
        }
    }
}

/// Why an approve may not proceed yet.
pub(super) enum Refusal {
    /// No session token was given: one was opened, to be sent back once the
    /// human allowed it.
    Required { token: String },
    /// The token names no session of this request, or one not allowed (yet):
    /// its result (`waiting`, `deny` or `unknown`).
    NotAllowed(&'static str),
}

#[derive(Default)]
pub(super) struct Sca {
    /// Per-request rules, set through the simulator's control endpoint.
    rules: HashMap<String, ScaAuto>,
    sessions: HashMap<String, Session>,
}

impl Sca {
    pub fn require(&mut self, request_id: &str, auto: ScaAuto) {
        self.rules.insert(request_id.to_owned(), auto);
    }

    /// The rule for this request: its own, else the fake's global one.
    pub fn rule(&self, request_id: &str, global: Option<ScaAuto>) -> Option<ScaAuto> {
        self.rules.get(request_id).copied().or(global)
    }

    /// `Ok` when the approve may proceed under `token`.
    pub fn check(
        &mut self,
        request_id: &str,
        auto: ScaAuto,
        token: Option<&str>,
    ) -> Result<(), Refusal> {
        let Some(token) = token else {
            let token = random_hex(16);
            let session = Session {
                request_id: request_id.to_owned(),
                started: Instant::now(),
                auto,
                decided: None,
            };
            self.sessions.insert(token.clone(), session);
            return Err(Refusal::Required { token });
        };
        match self.sessions.get(token) {
            Some(session) if session.request_id == request_id => match session.result() {
                "allow" => Ok(()),
                other => Err(Refusal::NotAllowed(other)),
            },
            _ => Err(Refusal::NotAllowed("unknown")),
        }
    }

    /// The session's result; `None` for an unknown token.
    pub fn result(&self, token: &str) -> Option<&'static str> {
        self.sessions.get(token).map(Session::result)
    }

    /// Plays the human; `false` for an unknown token.
    pub fn decide(&mut self, token: &str, result: &'static str) -> bool {
        match self.sessions.get_mut(token) {
            Some(session) => {
                session.decided = Some(result);
                true
            }
            None => false,
        }
    }
}
