//! The client's contract tests (wiremock), then the simulator half's tests.

use super::*;
use crate::{decision::parse, settings::Settings};

fn decision(target: &str, action: &str, reason: Option<&str>) -> Decision {
    let reason = reason
        .map(|r| format!(r#","reason":"{r}""#))
        .unwrap_or_default();
    parse(
        format!(r#"{{"decision_id":"d","provider":"qonto","action":"{action}","target":{target}{reason}}}"#)
            .as_bytes(),
    )
    .unwrap()
}

#[test]
fn singular_types_map_to_plural_paths() {
    let d = decision(
        r#"{"request_type":"virtual_card","request_id":"7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b"}"#,
        "approve",
        None,
    );
    assert_eq!(target(&d).unwrap().plural, "virtual_cards");
}

#[test]
fn target_rules() {
    let q = |t: &str, a: &str, r: Option<&str>| {
        let d = decision(t, a, r);
        let provider = Qonto {
            http: Http::new(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(1),
            )
            .unwrap(),
            base: Url::parse("http://x").unwrap(),
            auth: Auth::Bearer(SecretString::from("t")),
            staging_token: None,
        };
        provider.validate(&d).map(drop)
    };
    let id = "7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b";
    assert!(
        q(
            &format!(r#"{{"request_type":"transfers","request_id":"{id}"}}"#),
            "reject",
            Some("no")
        )
        .is_ok()
    );
    let e = q(
        &format!(r#"{{"request_type":"transfers","request_id":"{id}"}}"#),
        "reject",
        None,
    )
    .unwrap_err();
    assert!(e.contains("reason"), "{e}");
    let e = q(
        r#"{"request_type":"transfers","request_id":"../x"}"#,
        "approve",
        None,
    )
    .unwrap_err();
    assert!(e.contains("UUID"), "{e}");
    let e = q(
        &format!(r#"{{"request_type":"loans","request_id":"{id}"}}"#),
        "approve",
        None,
    )
    .unwrap_err();
    assert!(e.contains("request_type"), "{e}");
    let e = q(
        &format!(r#"{{"request_type":"transfers","request_id":"{id}","debit_iban":"x/y"}}"#),
        "approve",
        None,
    )
    .unwrap_err();
    assert!(e.contains("debit_iban"), "{e}");
}

#[test]
fn parses_error_bodies() {
    let body =
        json!({"errors":[{"code":"kyc_not_accepted","detail":"Approver kyc is not accepted"}]});
    assert_eq!(
        error_code(&body),
        (
            Some("kyc_not_accepted".into()),
            Some("Approver kyc is not accepted".into())
        )
    );
}

/// Where Qonto's status table departs from the shared one (itself pinned
/// in `http`), so any drift on either side fails here.
#[test]
fn status_table() {
    use ErrorClass::Permanent;
    let overrides = vec![(400, Permanent), (403, Permanent), (420, Permanent)];
    assert_eq!(http::overrides(Qonto::classify), overrides);
}

#[test]
fn credential_headers_are_sensitive() {
    let qonto = |auth| Qonto {
        http: Http::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
        )
        .unwrap(),
        base: Url::parse("http://x").unwrap(),
        auth,
        staging_token: Some(SecretString::from("s")),
    };
    for auth in [
        Auth::ApiKey(SecretString::from("login:secret")),
        Auth::Bearer(SecretString::from("t")),
    ] {
        let p = qonto(auth);
        let req = p.request(Method::GET, p.base.clone());
        http::assert_sensitive(req, &["Authorization", "X-Qonto-Staging-Token"]);
    }
}

#[test]
fn credential_sets_and_partial_api_keys() {
    let http = Http::new(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let build_with = |vars: &[(&str, &str)]| {
        let vars = vars
            .iter()
            .map(|(k, v)| (format!("APPROVAL_PROVIDERS__QONTO__{k}"), v.to_string()));
        build(&Settings::load_from(None, vars).unwrap().providers, &http)
    };
    assert!(build_with(&[]).unwrap().is_none());
    assert!(build_with(&[("ACCESS_TOKEN", "t")]).unwrap().is_some());
    assert!(
        build_with(&[("LOGIN", "l"), ("SECRET_KEY", "s")])
            .unwrap()
            .is_some()
    );
    for (set, missing) in [("LOGIN", "SECRET_KEY"), ("SECRET_KEY", "LOGIN")] {
        // An access token does not excuse half an API key.
        for extra in [None, Some(("ACCESS_TOKEN", "t"))] {
            let vars: Vec<_> = [(set, "x")].into_iter().chain(extra).collect();
            let Err(SettingsError::Invalid { key, .. }) = build_with(&vars) else {
                panic!("{set} alone must stop start-up");
            };
            assert_eq!(key, format!("APPROVAL_PROVIDERS__QONTO__{missing}"));
        }
    }
}

/// The client against Qonto played by wiremock, answering exactly as each
/// scenario says.
mod wire {
    use std::time::Duration;

    use serde_json::{Value, json};
    use wiremock::{
        Mock, MockServer, Request, ResponseTemplate,
        matchers::{method, path},
    };

    use super::*;

    pub(super) const RID: &str = "7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b";
    const OTHER: &str = "0c9a53f2-1d2e-4f7a-8b6c-5e4d3c2b1a09";
    const SCA_TOKEN: &str = "sca-S3CRET-5f0c1e";

    pub(super) fn provider(base: &str) -> Arc<dyn Client> {
        let http = Http::new(Duration::from_secs(5), Duration::from_secs(2)).unwrap();
        let vars = [
            ("BASE_URL", base),
            ("LOGIN", "q-login"),
            ("SECRET_KEY", "q-secret"),
        ]
        .map(|(k, v)| (format!("APPROVAL_PROVIDERS__QONTO__{k}"), v.to_owned()));
        build(&Settings::load_from(None, vars).unwrap().providers, &http)
            .unwrap()
            .expect("enabled")
    }

    fn reject() -> Decision {
        decision(
            &format!(r#"{{"request_type":"transfers","request_id":"{RID}"}}"#),
            "reject",
            Some("no"),
        )
    }

    fn approve() -> Decision {
        decision(
            &format!(r#"{{"request_type":"transfers","request_id":"{RID}"}}"#),
            "approve",
            None,
        )
    }

    fn ctx(token: Option<&str>) -> CallContext {
        CallContext {
            idempotency_key: "idem-q-1".into(),
            attempt: 1,
            confirmation_token: token.map(str::to_owned),
        }
    }

    fn h<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
        r.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn assert_decision_call(r: &Request, verb: &str, body: &str) {
        assert_eq!(r.method.as_str(), "POST");
        assert_eq!(r.url.path(), format!("/v2/requests/transfers/{RID}/{verb}"));
        assert_eq!(r.url.query(), None);
        assert_eq!(h(r, "authorization"), Some("q-login:q-secret"));
        assert_eq!(h(r, "x-qonto-idempotency-key"), Some("idem-q-1"));
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), body);
    }

    async fn answering(verb: &str, reply: ResponseTemplate) -> MockServer {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(format!("/v2/requests/transfers/{RID}/{verb}")))
            .respond_with(reply)
            .mount(&server)
            .await;
        server
    }

    fn ok(body: Value) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(body)
    }

    /// Qonto replays a cached success for an idempotency key whatever the
    /// new call names: a 200 for another request proves nothing about ours.
    #[tokio::test]
    async fn a_cached_success_for_another_request_is_ambiguous() {
        let answer = json!({"request_transfer": {"id": OTHER, "request_type": "transfer", "status": "declined"}});
        let server = answering("decline", ok(answer)).await;
        let err = provider(&server.uri())
            .apply(&reject(), &ctx(None))
            .await
            .expect_err("another request's success is not ours");
        assert_eq!(err.class, ErrorClass::Ambiguous);
        assert_eq!(err.http_status, Some(200));
        assert!(err.message.contains(OTHER), "{}", err.message);
        assert!(err.message.contains(RID), "{}", err.message);
        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), 1);
        assert_decision_call(&calls[0], "decline", r#"{"declined_note":"no"}"#);
    }

    /// Our request, but not in the decided state (or no state, or no id):
    /// the answer does not prove the decision was applied.
    #[tokio::test]
    async fn an_answer_without_the_decided_state_is_ambiguous() {
        let cases = [
            (
                "decline",
                reject(),
                json!({"request_transfer": {"id": RID, "status": "approved"}}),
            ),
            (
                "decline",
                reject(),
                json!({"request_transfer": {"id": RID}}),
            ),
            (
                "decline",
                reject(),
                json!({"request_transfer": {"status": "declined"}}),
            ),
            (
                "approve",
                approve(),
                json!({"request_transfer": {"id": RID, "status": "pending"}}),
            ),
            (
                "approve",
                approve(),
                json!({"request_virtual_card": {"id": RID, "request_type": "virtual_card", "status": "approved"}}),
            ),
            ("approve", approve(), json!({"ok": true})),
            ("approve", approve(), Value::Null),
        ];
        for (verb, d, answer) in cases {
            let server = answering(verb, ok(answer.clone())).await;
            let err = provider(&server.uri())
                .apply(&d, &ctx(None))
                .await
                .expect_err(&format!("{answer} proves nothing"));
            assert_eq!(err.class, ErrorClass::Ambiguous, "{answer}");
        }
        // The decided state on our own request is the only proof.
        let answer = json!({"request_transfer": {"id": RID, "request_type": "transfer", "status": "approved"}});
        let server = answering("approve", ok(answer)).await;
        let Reply::Done { state, .. } = provider(&server.uri())
            .apply(&approve(), &ctx(None))
            .await
            .unwrap()
        else {
            panic!("expected Done");
        };
        assert_eq!(state.as_deref(), Some("approved"));
    }

    /// Numbers where Qonto sends text (ids, statuses) and numbers no type
    /// holds are provider errors, never a panic.
    #[tokio::test]
    async fn an_id_of_the_wrong_type_is_a_provider_error() {
        for raw in [
            r#"{"request_transfer":{"id":12345,"status":"declined"}}"#,
            r#"{"request_transfer":{"id":1e400,"status":"declined"}}"#,
            r#"{"request_transfer":{"id":{"uuid":"x"},"status":["declined"]}}"#,
            r#"{"request_transfer":{"id":"7b6f4c1e-3c55-4a56-9f5e-0d6a1c1f2a3b","status":18446744073709551616}}"#,
        ] {
            let reply = ResponseTemplate::new(200).set_body_raw(raw, "application/json");
            let server = answering("decline", reply).await;
            let err = provider(&server.uri())
                .apply(&reject(), &ctx(None))
                .await
                .expect_err(raw);
            assert_eq!(err.class, ErrorClass::Ambiguous, "{raw}");
        }

        // In the list, an entry with a numeric id is not our request, and our
        // request with a numeric status is unreadable, not a conflict.
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v2/requests"))
            .respond_with(ok(json!({
                "requests": [{"id": 7, "status": "approved"}, {"id": RID, "status": 3}],
                "meta": {"next_page": null},
            })))
            .mount(&server)
            .await;
        let err = provider(&server.uri())
            .read_state(&reject())
            .await
            .expect_err("a numeric status is no state");
        assert_ne!(err.class, ErrorClass::Ambiguous);
        assert!(err.message.contains("status"), "{}", err.message);
    }

    /// Every reconciliation read is filtered (status, type, time window,
    /// order) and bounded: against a list that never ends, at most
    /// `MAX_LIST_CALLS` calls, each with the documented query.
    #[tokio::test]
    async fn reconciliation_reads_are_filtered_and_bounded() {
        let server = MockServer::start().await;
        let others: Vec<Value> = (0..100)
            .map(|_| json!({"id": uuid::Uuid::new_v4().to_string(), "request_type": "transfer", "status": "declined"}))
            .collect();
        Mock::given(method("GET"))
            .and(path("/v2/requests"))
            .respond_with(ok(json!({"requests": others, "meta": {"next_page": 2}})))
            .mount(&server)
            .await;
        let before = time::OffsetDateTime::now_utc();
        let err = provider(&server.uri())
            .read_state(&reject())
            .await
            .expect_err("not listed");
        assert!(err.message.contains(RID), "{}", err.message);

        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), MAX_LIST_CALLS as usize);
        let query = |r: &Request| -> Vec<(String, String)> {
            r.url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        for r in &calls {
            assert_eq!(r.method.as_str(), "GET");
            assert_eq!(h(r, "authorization"), Some("q-login:q-secret"));
        }
        // Decided as decided lately: processed within the window, newest first.
        let first = query(&calls[0]);
        let since = &first
            .iter()
            .find(|(k, _)| k == "processed_at_from")
            .expect("a time window")
            .1;
        let since =
            time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
                .expect("an RFC 3339 time");
        let window = before - since;
        assert!(
            window >= time::Duration::hours(23) && window <= time::Duration::hours(25),
            "{window}"
        );
        let since = since
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        for (page, call) in [("1", &calls[0]), ("2", &calls[1])] {
            assert_eq!(
                query(call),
                pairs(&[
                    ("status[]", "declined"),
                    ("request_type[]", "transfer"),
                    ("processed_at_from", &since),
                    ("sort_by", "processed_at:desc"),
                    ("per_page", "100"),
                    ("page", page),
                ])
            );
        }
        // Still pending: oldest first.
        for (page, call) in [("1", &calls[2]), ("2", &calls[3])] {
            assert_eq!(
                query(call),
                pairs(&[
                    ("status[]", "pending"),
                    ("request_type[]", "transfer"),
                    ("sort_by", "created_at:asc"),
                    ("per_page", "100"),
                    ("page", page),
                ])
            );
        }
        // Decided earlier, either way: the last decisions first.
        for (page, call) in [("1", &calls[4]), ("2", &calls[5])] {
            assert_eq!(
                query(call),
                pairs(&[
                    ("status[]", "approved"),
                    ("status[]", "declined"),
                    ("status[]", "canceled"),
                    ("request_type[]", "transfer"),
                    ("sort_by", "processed_at:desc"),
                    ("per_page", "100"),
                    ("page", page),
                ])
            );
        }
    }

    /// The SCA session token is a credential for the approve: it is kept
    /// for the replay but appears nowhere in the answer the event carries.
    #[tokio::test]
    async fn the_sca_session_token_is_redacted_from_the_confirmation_answer() {
        let answer = json!({
            "errors": [{
                "code": "sca_required",
                "detail": format!("SCA required, session {SCA_TOKEN}"),
                "meta": {"sca_session_token": SCA_TOKEN},
            }],
            "sca_session_token": SCA_TOKEN,
            "sca_session_expires_at": "2026-11-21T10:15:00Z",
        });
        let server = answering("approve", ResponseTemplate::new(428).set_body_json(answer)).await;
        let reply = provider(&server.uri())
            .apply(&approve(), &ctx(None))
            .await
            .unwrap();
        let Reply::NeedsConfirmation {
            token,
            expires_at,
            response,
        } = reply
        else {
            panic!("expected NeedsConfirmation");
        };
        assert_eq!(token, SCA_TOKEN);
        assert_eq!(expires_at.as_deref(), Some("2026-11-21T10:15:00Z"));
        let text = response.to_string();
        assert!(!text.contains(SCA_TOKEN), "{text}");
        assert_eq!(response["errors"][0]["code"], "sca_required");
        assert_eq!(response["sca_session_expires_at"], "2026-11-21T10:15:00Z");
    }

    /// The replay after SCA carries the token; whatever Qonto answers
    /// (a 412 that quotes it, a success that echoes it), the error, its
    /// message and the kept answer never do.
    #[tokio::test]
    async fn the_sca_session_token_never_reaches_an_error_or_an_answer() {
        let quoting = json!({
            "errors": [{"code": "sca_session_invalid", "detail": format!("session {SCA_TOKEN} is not allowed")}],
            "sca_session_token": SCA_TOKEN,
        });
        let server = answering("approve", ResponseTemplate::new(412).set_body_json(quoting)).await;
        let err = provider(&server.uri())
            .apply(&approve(), &ctx(Some(SCA_TOKEN)))
            .await
            .expect_err("412");
        let calls = server.received_requests().await.unwrap();
        assert_eq!(h(&calls[0], "x-qonto-sca-session-token"), Some(SCA_TOKEN));
        let text = format!("{} {:?} {:?}", err.message, err.response, err);
        assert!(!text.contains(SCA_TOKEN), "{text}");

        let echoing = json!({"request_transfer": {"id": RID, "status": "approved", "sca_session_token": SCA_TOKEN}});
        let server = answering("approve", ok(echoing)).await;
        let Reply::Done { response, .. } = provider(&server.uri())
            .apply(&approve(), &ctx(Some(SCA_TOKEN)))
            .await
            .unwrap()
        else {
            panic!("expected Done");
        };
        assert!(!response.to_string().contains(SCA_TOKEN), "{response}");
    }
}

/// The simulator half, driven over HTTP like the worker drives it.
mod simulator {
    use super::super::sim;
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::providers::contract::Verdict;
    use crate::tools::sim::testkit::{client, new_id, parts, sim, sim_with};
    use crate::tools::sim::{Faults, ScaAuto, SimConfig, SimHandle, SimStats};

    const AUTH: &str = "sim-qonto:sim-qonto-secret";

    async fn decide(
        sim: &SimHandle,
        kind: &str,
        id: &str,
        action: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}/v2/requests/{kind}/{id}/{action}", sim.base_url("qonto"));
        let mut request = client()
            .post(url)
            .header("Authorization", AUTH)
            .header("X-Qonto-Idempotency-Key", key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        parts(request.send().await.unwrap()).await
    }

    #[tokio::test]
    async fn decline_and_approve_succeed() {
        let sim = sim().await;
        let (declined, approved) = (new_id(), new_id());

        let (status, body) = decide(
            &sim,
            "virtual_cards",
            &declined,
            "decline",
            &new_id(),
            Some(json!({"declined_note": "no"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let request = &body["request_virtual_card"];
        assert_eq!(request["status"], "declined");
        assert_eq!(request["declined_note"], "no");
        assert_eq!(request["request_type"], "virtual_card");
        assert!(request["processed_at"].is_string());

        let (status, body) = decide(&sim, "transfers", &approved, "approve", &new_id(), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["request_transfer"]["status"], "approved");

        assert_eq!(
            sim.target_state("qonto", &declined).as_deref(),
            Some("declined")
        );
        assert_eq!(
            sim.target_state("qonto", &approved).as_deref(),
            Some("approved")
        );
        let stats = sim.stats().provider("qonto").unwrap().clone();
        assert_eq!(stats.state_changes, 2);
        assert_eq!(stats.state_changing_calls, 2);
        assert_eq!(stats.double_state_changes, 0);
        assert_eq!(stats.by_status.get(&200), Some(&2));
    }

    #[tokio::test]
    async fn oauth_bearer_is_accepted_and_bad_credentials_get_401() {
        let sim = sim().await;
        let url = format!(
            "{}/v2/requests/transfers/{}/decline",
            sim.base_url("qonto"),
            new_id()
        );
        let send = |auth: Option<&'static str>| {
            let mut request = client()
                .post(&url)
                .header("X-Qonto-Idempotency-Key", new_id())
                .json(&json!({"declined_note": "x"}));
            if let Some(auth) = auth {
                request = request.header("Authorization", auth);
            }
            async move { parts(request.send().await.unwrap()).await }
        };

        let (status, body) = send(Some("sim-qonto:wrong")).await;
        assert_eq!(status, 401);
        assert_eq!(body["errors"][0]["code"], "authorization_token_invalid");
        let (status, body) = send(None).await;
        assert_eq!(status, 401);
        assert_eq!(body["errors"][0]["code"], "authorization_header_missing");
        let (status, _) = send(Some("Bearer sim-qonto-token")).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn missing_key_or_note_is_refused_without_state_change() {
        let sim = sim().await;
        let id = new_id();
        let url = format!(
            "{}/v2/requests/transfers/{id}/decline",
            sim.base_url("qonto")
        );
        let response = client()
            .post(&url)
            .header("Authorization", AUTH)
            .json(&json!({"declined_note": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);

        let (status, body) = decide(&sim, "transfers", &id, "decline", "k1", Some(json!({}))).await;
        assert_eq!(status, 422);
        assert_eq!(body["errors"][0]["source"]["pointer"], "/declined_note");
        // Errors are not cached: the same key works once the body is right.
        let (status, _) = decide(
            &sim,
            "transfers",
            &id,
            "decline",
            "k1",
            Some(json!({"declined_note": "x"})),
        )
        .await;
        assert_eq!(status, 200);

        let (status, _) = decide(&sim, "transfer", &new_id(), "approve", "k2", None).await;
        assert_eq!(status, 404, "singular path segment is not a Qonto route");
    }

    #[tokio::test]
    async fn opposite_decision_conflicts_and_counts_a_double_change() {
        let sim = sim().await;
        let id = new_id();
        let note = Some(json!({"declined_note": "no"}));
        assert_eq!(
            decide(&sim, "transfers", &id, "decline", "key-a", note)
                .await
                .0,
            200
        );

        let (status, body) = decide(&sim, "transfers", &id, "approve", "key-b", None).await;
        assert_eq!(status, 422);
        assert_eq!(body["errors"][0]["code"], "request_not_pending");
        assert_eq!(body["errors"][0]["source"]["pointer"], "/status");

        let stats = sim.stats().provider("qonto").unwrap().clone();
        assert_eq!(stats.double_state_changes, 1);
        assert_eq!(stats.conflicting_keys, 1);
        let target = sim.target("qonto", &id).unwrap();
        assert_eq!(target.state, "declined");
        assert_eq!(target.keys, ["key-a", "key-b"]);
    }

    #[tokio::test]
    async fn same_key_replays_the_cached_success() {
        let sim = sim().await;
        let id = new_id();
        let first = decide(
            &sim,
            "multi_transfers",
            &id,
            "decline",
            "same-key",
            Some(json!({"declined_note": "first"})),
        )
        .await;
        assert_eq!(first.0, 200);
        // A different body, and even a different action, gets the cached answer.
        let second = decide(
            &sim,
            "multi_transfers",
            &id,
            "decline",
            "same-key",
            Some(json!({"declined_note": "second"})),
        )
        .await;
        let third = decide(&sim, "multi_transfers", &id, "approve", "same-key", None).await;
        assert_eq!(second, first);
        assert_eq!(third, first);
        assert_eq!(first.1["request_multi_transfer"]["declined_note"], "first");

        let stats = sim.stats().provider("qonto").unwrap().clone();
        assert_eq!(stats.state_changes, 1);
        assert_eq!(stats.state_changing_calls, 3);
        assert_eq!(stats.double_state_changes, 0);
        assert_eq!(stats.conflicting_keys, 0);
    }

    #[tokio::test]
    async fn cached_success_expires_after_the_ttl() {
        let sim = sim_with(SimConfig::default().with(sim::Options {
            idempotency_ttl: Duration::ZERO,
            ..sim::Options::default()
        }))
        .await;
        let id = new_id();
        let note = Some(json!({"declined_note": "x"}));
        assert_eq!(
            decide(&sim, "transfers", &id, "decline", "k", note.clone())
                .await
                .0,
            200
        );
        let (status, _) = decide(&sim, "transfers", &id, "decline", "k", note).await;
        assert_eq!(status, 422, "an expired key is processed as a new request");
        assert_eq!(
            sim.stats()
                .provider("qonto")
                .unwrap()
                .clone()
                .double_state_changes,
            1
        );
    }

    async fn sca_session(sim: &SimHandle, token: &str) -> (u16, Value) {
        let url = format!("{}/v2/sca_sessions/{token}", sim.base_url("qonto"));
        parts(
            client()
                .get(url)
                .header("Authorization", AUTH)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn approve_with_sca(sim: &SimHandle, id: &str, key: &str, token: &str) -> (u16, Value) {
        let url = format!(
            "{}/v2/requests/transfers/{id}/approve",
            sim.base_url("qonto")
        );
        let request = client()
            .post(url)
            .header("Authorization", AUTH)
            .header("X-Qonto-Idempotency-Key", key)
            .header("X-Qonto-Sca-Session-Token", token);
        parts(request.send().await.unwrap()).await
    }

    #[tokio::test]
    async fn sca_428_then_mocked_allow_then_approve() {
        let sim = sim().await;
        let id = new_id();
        sim.require_sca(&id, ScaAuto::Manual);

        let (status, body) = decide(&sim, "transfers", &id, "approve", "key", None).await;
        assert_eq!(status, 428);
        assert_eq!(body["errors"][0]["code"], "sca_required");
        let token = body["sca_session_token"].as_str().unwrap().to_owned();
        let expires = body["sca_session_expires_at"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
        assert_eq!(sim.target_state("qonto", &id).as_deref(), Some("pending"));

        assert_eq!(sca_session(&sim, &token).await.1["result"], "waiting");
        let (status, _) = approve_with_sca(&sim, &id, "key", &token).await;
        assert_eq!(status, 412, "a waiting session does not allow the approve");

        let url = format!(
            "{}/v2/mocked_sca_sessions/{token}/allow",
            sim.base_url("qonto")
        );
        let response = client()
            .post(url)
            .header("Authorization", AUTH)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (status, body) = sca_session(&sim, &token).await;
        assert_eq!((status, body["result"].clone()), (200, json!("allow")));
        assert!(body["canceled_at"].is_null());

        let (status, body) = approve_with_sca(&sim, &id, "key", &token).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["request_transfer"]["status"], "approved");
        let stats = sim.stats().provider("qonto").unwrap().clone();
        assert_eq!((stats.state_changes, stats.double_state_changes), (1, 0));
        assert_eq!(stats.conflicting_keys, 0);
    }

    #[tokio::test]
    async fn sca_auto_rules_resolve_without_a_human() {
        let sim = sim_with(SimConfig::default().with(sim::Options {
            sca_for_all_approvals: Some(ScaAuto::Allow {
                after: Duration::ZERO,
            }),
            ..sim::Options::default()
        }))
        .await;
        let allowed = new_id();
        let (status, body) = decide(&sim, "flash_cards", &allowed, "approve", "k1", None).await;
        assert_eq!(status, 428);
        let token = body["sca_session_token"].as_str().unwrap();
        assert_eq!(sca_session(&sim, token).await.1["result"], "allow");

        // A per-request rule overrides the global one.
        let denied = new_id();
        sim.require_sca(
            &denied,
            ScaAuto::Deny {
                after: Duration::ZERO,
            },
        );
        let (_, body) = decide(&sim, "transfers", &denied, "approve", "k2", None).await;
        let token = body["sca_session_token"].as_str().unwrap().to_owned();
        assert_eq!(sca_session(&sim, &token).await.1["result"], "deny");
        let (status, _) = approve_with_sca(&sim, &denied, "k2", &token).await;
        assert_eq!(status, 412);
        assert_eq!(
            sim.target_state("qonto", &denied).as_deref(),
            Some("pending")
        );

        // Declines never need SCA.
        let note = Some(json!({"declined_note": "x"}));
        assert_eq!(
            decide(&sim, "transfers", &denied, "decline", "k3", note)
                .await
                .0,
            200
        );
    }

    #[tokio::test]
    async fn list_filters_and_pages_newest_first() {
        let sim = sim().await;
        let ids: Vec<String> = (0..3).map(|_| new_id()).collect();
        for id in &ids {
            let note = Some(json!({"declined_note": "x"}));
            assert_eq!(
                decide(&sim, "transfers", id, "decline", &new_id(), note)
                    .await
                    .0,
                200
            );
        }
        let card = new_id();
        assert_eq!(
            decide(&sim, "virtual_cards", &card, "approve", &new_id(), None)
                .await
                .0,
            200
        );

        let url = format!(
            "{}/v2/requests?status[]=declined&request_type[]=transfer&per_page=2&page=1",
            sim.base_url("qonto")
        );
        let (status, body) = parts(
            client()
                .get(url)
                .header("Authorization", AUTH)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        let listed: Vec<&str> = body["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
        assert_eq!(
            body["meta"],
            json!({"current_page": 1, "next_page": 2, "prev_page": null, "total_pages": 2, "total_count": 3, "per_page": 2})
        );

        let url = format!(
            "{}/v2/requests?status%5B%5D=approved",
            sim.base_url("qonto")
        );
        let (_, body) = parts(
            client()
                .get(url)
                .header("Authorization", AUTH)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(body["requests"][0]["id"], card.as_str());
        assert_eq!(body["meta"]["total_count"], 1);

        let url = format!("{}/v2/requests?per_page=101", sim.base_url("qonto"));
        let response = client()
            .get(url)
            .header("Authorization", AUTH)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);

        let url = format!("{}/v2/requests?page=two", sim.base_url("qonto"));
        let request = client().get(url).header("Authorization", AUTH);
        let (status, body) = parts(request.send().await.unwrap()).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["errors"][0]["code"], "invalid_parameter");
    }

    fn decline_note() -> Option<Value> {
        Some(json!({"declined_note": "no"}))
    }

    fn qonto(stats: SimStats) -> crate::tools::sim::ProviderStats {
        stats.provider("qonto").unwrap().clone()
    }

    #[tokio::test]
    async fn faults_answer_in_qontos_error_shape_before_any_state_change() {
        let sim = sim().await;
        sim.set_faults(
            "qonto",
            Faults {
                error_rate: 1.0,
                ..Faults::default()
            },
        );
        let id = new_id();
        let (status, body) = decide(&sim, "transfers", &id, "decline", "k", decline_note()).await;
        assert_eq!(status, 503);
        assert_eq!(body["errors"][0]["code"], "service_unavailable");
        assert_eq!(sim.target_state("qonto", &id), None);

        sim.set_faults(
            "qonto",
            Faults {
                error_rate: 1.0,
                error_status: 500,
                ..Faults::default()
            },
        );
        let (status, _) = decide(&sim, "transfers", &id, "decline", "k", decline_note()).await;
        assert_eq!(status, 500);

        sim.set_faults("qonto", Faults::default());
        let (status, _) = decide(&sim, "transfers", &id, "decline", "k", decline_note()).await;
        assert_eq!(status, 200);
        let stats = qonto(sim.stats());
        assert_eq!((stats.state_changing_calls, stats.state_changes), (3, 1));
        assert_eq!(stats.by_status.get(&503), Some(&1));
    }

    #[tokio::test]
    async fn rate_limit_is_429_with_retry_after() {
        let sim = sim().await;
        sim.set_faults(
            "qonto",
            Faults {
                rate_limit_ratio: 1.0,
                retry_after_secs: 7,
                ..Faults::default()
            },
        );
        let url = format!(
            "{}/v2/requests/transfers/{}/decline",
            sim.base_url("qonto"),
            new_id()
        );
        let response = client()
            .post(url)
            .header("Authorization", AUTH)
            .header("X-Qonto-Idempotency-Key", "k")
            .json(&json!({"declined_note": "no"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "7");
        let (_, body) = parts(response).await;
        assert_eq!(body["errors"][0]["code"], "too_many_requests");
    }

    #[tokio::test]
    async fn a_dropped_connection_leaves_no_answer_and_no_change() {
        let sim = sim().await;
        sim.set_faults(
            "qonto",
            Faults {
                reset_ratio: 1.0,
                ..Faults::default()
            },
        );
        let id = new_id();
        let url = format!(
            "{}/v2/requests/transfers/{id}/decline",
            sim.base_url("qonto")
        );
        let err = client()
            .post(url)
            .header("Authorization", AUTH)
            .header("X-Qonto-Idempotency-Key", "k")
            .json(&json!({"declined_note": "no"}))
            .send()
            .await
            .unwrap_err();
        assert!(err.status().is_none(), "{err:?}");
        assert_eq!(sim.target_state("qonto", &id), None);
        let stats = qonto(sim.stats());
        assert_eq!((stats.dropped_connections, stats.state_changes), (1, 0));
        assert!(stats.by_status.is_empty());
    }

    /// The ambiguous outcome Qonto's idempotency keys exist for: the retry
    /// with the same key gets the success Qonto cached.
    #[tokio::test]
    async fn apply_then_fail_is_replayed_under_the_same_key() {
        let sim = sim().await;
        sim.set_faults(
            "qonto",
            Faults {
                apply_then_fail_ratio: 1.0,
                ..Faults::default()
            },
        );
        let id = new_id();
        let url = format!(
            "{}/v2/requests/transfers/{id}/decline",
            sim.base_url("qonto")
        );
        let sent = client()
            .post(url)
            .header("Authorization", AUTH)
            .header("X-Qonto-Idempotency-Key", "k")
            .json(&json!({"declined_note": "no"}))
            .send()
            .await;
        match sent {
            Ok(response) => assert_eq!(response.status(), 503),
            Err(err) => assert!(err.status().is_none(), "{err:?}"),
        }
        assert_eq!(sim.target_state("qonto", &id).as_deref(), Some("declined"));

        sim.set_faults("qonto", Faults::default());
        let (status, body) = decide(&sim, "transfers", &id, "decline", "k", decline_note()).await;
        assert_eq!(status, 200);
        assert_eq!(body["request_transfer"]["status"], "declined");
        let stats = qonto(sim.stats());
        assert_eq!((stats.state_changes, stats.double_state_changes), (1, 0));
    }

    /// `/_sim/*` against Qonto's own wire: faults, the target view, counts,
    /// the SCA mark and a reset that clears the idempotency cache.
    #[tokio::test]
    async fn control_endpoints_drive_qonto() {
        let sim = sim().await;
        let root = sim.root_url();
        let id = new_id();
        let decline = || decide(&sim, "transfers", &id, "decline", "k", decline_note());

        let faults_url = format!("{root}/_sim/faults/qonto");
        let set = |faults: Value| client().put(&faults_url).json(&faults).send();
        assert_eq!(set(json!({"down": true})).await.unwrap().status(), 200);
        assert_eq!(decline().await.0, 503);
        assert_eq!(set(json!({})).await.unwrap().status(), 200);
        assert_eq!(decline().await.0, 200);

        let (status, target) = parts(
            client()
                .get(format!("{root}/_sim/targets/qonto/{id}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(target["state"], "declined");
        assert_eq!(target["keys"], json!(["k"]));
        assert_eq!(qonto(sim.stats()).calls, 2, "control calls are not counted");
        assert_eq!(sim.stats().total().state_changes, 1);

        let sca_id = new_id();
        let sca = json!({"request_id": sca_id, "auto": "allow", "after_ms": 0});
        let response = client()
            .post(format!("{root}/_sim/qonto/sca"))
            .json(&sca)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
        let (status, body) = decide(&sim, "transfers", &sca_id, "approve", "sca", None).await;
        assert_eq!(status, 428);
        assert!(body["sca_session_token"].is_string());

        let response = client()
            .post(format!("{root}/_sim/reset"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
        assert_eq!(sim.target_state("qonto", &id), None);
        // The idempotency cache was cleared too: the key is processed afresh.
        let (status, body) = decline().await;
        assert_eq!(
            (status, body["request_transfer"]["status"].clone()),
            (200, json!("declined"))
        );
    }

    /// A busy organisation: 2,500 transfer requests approved after the two
    /// we reconcile (one declined, one still waiting for SCA), so both are
    /// among the oldest. The filtered read finds each in a call or two,
    /// where walking the whole list newest first gave up after 2,000.
    #[tokio::test]
    async fn targets_among_the_oldest_of_2500_requests_are_found_in_few_calls() {
        use futures_util::{StreamExt, stream};

        let sim = sim().await;
        let declined = new_id();
        let note = Some(json!({"declined_note": "no"}));
        let (status, _) = decide(&sim, "transfers", &declined, "decline", &new_id(), note).await;
        assert_eq!(status, 200);
        let waiting = new_id();
        sim.require_sca(&waiting, ScaAuto::Manual);
        let (status, _) = decide(&sim, "transfers", &waiting, "approve", &new_id(), None).await;
        assert_eq!(status, 428);
        // One client for them all: building one per call would dominate.
        let http = client();
        let approved: Vec<u16> = stream::iter(0..2500)
            .map(|_| {
                let url = format!(
                    "{}/v2/requests/transfers/{}/approve",
                    sim.base_url("qonto"),
                    new_id()
                );
                let request = http
                    .post(url)
                    .header("Authorization", AUTH)
                    .header("X-Qonto-Idempotency-Key", new_id());
                async move { request.send().await.unwrap().status().as_u16() }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        assert!(approved.iter().all(|s| *s == 200));

        let clients = crate::tools::sim::testkit::clients(&sim, &[]);
        for (id, state, verdict, most) in [
            (&declined, "declined", Verdict::AsDecided, 1),
            (&waiting, "pending", Verdict::Pending, 2),
        ] {
            let d = super::decision(
                &format!(r#"{{"request_type":"transfers","request_id":"{id}"}}"#),
                "reject",
                Some("no"),
            );
            let before = qonto(sim.stats()).calls;
            let observed = crate::tools::sim::testkit::read_state(&clients, &d)
                .await
                .unwrap_or_else(|e| panic!("{state} target not found: {e}"));
            let calls = qonto(sim.stats()).calls - before;
            assert_eq!(
                (observed.state.as_str(), observed.verdict),
                (state, verdict)
            );
            assert_eq!(observed.response["id"], id.as_str());
            assert!(calls <= most, "{calls} list calls for the {state} target");
        }
    }

    /// The list filters the client sends, as Qonto documents them: a time
    /// window on `processed_at` / `created_at` and `sort_by`.
    #[tokio::test]
    async fn list_filters_by_time_window_and_sorts() {
        let sim = sim().await;
        let ids: Vec<String> = (0..3).map(|_| new_id()).collect();
        for id in &ids {
            let (status, _) =
                decide(&sim, "transfers", id, "decline", &new_id(), decline_note()).await;
            assert_eq!(status, 200);
        }
        let pending = new_id();
        sim.require_sca(&pending, ScaAuto::Manual);
        assert_eq!(
            decide(&sim, "transfers", &pending, "approve", "p", None)
                .await
                .0,
            428
        );

        let list = |query: String| {
            let url = format!("{}/v2/requests?{query}", sim.base_url("qonto"));
            async move {
                parts(
                    client()
                        .get(url)
                        .header("Authorization", AUTH)
                        .send()
                        .await
                        .unwrap(),
                )
                .await
            }
        };
        let listed = |body: &Value| -> Vec<String> {
            body["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let fmt = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        let now = time::OffsetDateTime::now_utc();
        let hour_ago = fmt(now - time::Duration::hours(1));
        let in_an_hour = fmt(now + time::Duration::hours(1));

        let (status, body) = list(format!(
            "status[]=declined&processed_at_from={hour_ago}&sort_by=processed_at:asc"
        ))
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(listed(&body), ids);
        let (_, body) = list(format!("processed_at_from={in_an_hour}")).await;
        assert_eq!(listed(&body), Vec::<String>::new());
        // A pending request has no processed_at: outside any processed window.
        let (_, body) = list(format!(
            "processed_at_to={in_an_hour}&sort_by=created_at:desc"
        ))
        .await;
        let mut newest_first = ids.clone();
        newest_first.reverse();
        assert_eq!(listed(&body), newest_first);
        let (_, body) = list(format!(
            "created_at_from={hour_ago}&created_at_to={in_an_hour}&status[]=pending"
        ))
        .await;
        assert_eq!(listed(&body), std::slice::from_ref(&pending));
        let (_, body) = list(format!("created_at_to={hour_ago}")).await;
        assert_eq!(body["meta"]["total_count"], 0);
        let (_, body) = list("sort_by=created_at:asc".into()).await;
        assert_eq!(listed(&body)[0], ids[0]);

        for bad in [
            "processed_at_from=yesterday",
            "sort_by=amount:asc",
            "sort_by=created_at",
        ] {
            let (status, body) = list(bad.into()).await;
            assert_eq!(status, 422, "{bad}: {body}");
            assert_eq!(body["errors"][0]["code"], "invalid_parameter", "{bad}");
        }
    }

    #[tokio::test]
    async fn worker_env_names_the_credentials_the_fake_accepts() {
        crate::tools::sim::testkit::assert_worker_env(
            "qonto",
            "/qonto",
            &[("LOGIN", "sim-qonto"), ("SECRET_KEY", "sim-qonto-secret")],
        )
        .await;
    }
}
