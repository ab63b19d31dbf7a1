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

/// The simulator half, driven over HTTP like the worker drives it.
mod simulator {
    use super::super::sim;
    use std::time::Duration;

    use serde_json::{Value, json};

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
