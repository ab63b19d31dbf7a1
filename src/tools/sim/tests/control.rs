//! `/_sim/*`, driven for every unit of the registry; decisions go through the
//! worker's own clients so no provider is named here.

use serde_json::json;

use crate::providers::Reply;
use crate::tools::sim::testkit::{apply, client, clients, new_id, parts, sample, sim};
use crate::tools::sim::{ProviderStats, SimStats, providers, unit};

/// Each provider's `tests.rs` checks its own credentials; here, that every
/// variable belongs to a unit and every unit gets its base URL.
#[tokio::test]
async fn worker_env_points_every_unit_at_the_sim() {
    let sim = sim().await;
    let env: std::collections::HashMap<String, String> = sim.worker_env().into_iter().collect();
    for provider in providers() {
        let key = format!("APPROVAL_PROVIDERS__{}__BASE_URL", provider.to_uppercase());
        assert_eq!(env[&key], sim.base_url(provider));
        assert!(sim.base_url(provider).starts_with(&sim.root_url()));
    }
    for key in env.keys() {
        let unit = key
            .strip_prefix("APPROVAL_PROVIDERS__")
            .and_then(|rest| rest.split_once("__"))
            .map(|(unit, _)| unit.to_lowercase());
        assert!(
            unit.is_some_and(|unit| providers().contains(&unit.as_str())),
            "{key}"
        );
    }
}

#[tokio::test]
async fn control_endpoints_drive_faults_targets_and_stats() {
    let sim = sim().await;
    let root = sim.root_url();
    let clients = clients(&sim, &[]);
    for &unit in providers() {
        let (decision, target) = sample(unit, "reject");
        let faults_url = format!("{root}/_sim/faults/{unit}");
        let response = client()
            .put(&faults_url)
            .json(&json!({"down": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{unit}");
        let err = apply(&clients, &decision, "k").await.unwrap_err();
        assert_eq!(err.http_status, Some(503), "{unit}: {err:?}");
        let (_, current) = parts(client().get(&faults_url).send().await.unwrap()).await;
        assert_eq!(current["down"], true, "{unit}");
        for refused in [json!({"dwon": true}), json!({"error_rate": 2.0})] {
            let response = client()
                .put(&faults_url)
                .json(&refused)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{unit}: {refused}");
        }
        let cleared = client()
            .put(&faults_url)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(cleared.status(), 200, "{unit}");
        let reply = apply(&clients, &decision, "k").await;
        assert!(matches!(reply, Ok(Reply::Done { .. })), "{unit}: {reply:?}");

        let (status, body) = parts(
            client()
                .get(format!("{root}/_sim/targets/{unit}/{target}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{unit}");
        let seen = sim.target(unit, &target).unwrap();
        assert_eq!(
            body,
            json!({"provider": unit, "key": target, "state": seen.state, "keys": seen.keys})
        );
        let unknown = client()
            .get(format!("{root}/_sim/targets/{unit}/{}", new_id()))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404, "{unit}");
    }

    let (status, stats) = parts(
        client()
            .get(format!("{root}/_sim/stats"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let stats: SimStats = serde_json::from_value(stats).unwrap();
    assert_eq!(stats, sim.stats(), "control calls are not counted");
    assert_eq!(stats.total().state_changes, providers().len() as u64);
    let unknown = client()
        .put(format!("{root}/_sim/faults/no_such_unit"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

/// Units with a confirmation step accept `/_sim/{unit}/sca`; the others
/// refuse it.
#[tokio::test]
async fn sca_control_reaches_units_with_a_confirmation_step() {
    let sim = sim().await;
    let root = sim.root_url();
    let clients = clients(&sim, &[]);
    for &name in providers() {
        let (decision, target) = sample(name, "approve");
        let sca = json!({"request_id": target, "auto": "allow", "after_ms": 0});
        let response = client()
            .post(format!("{root}/_sim/{name}/sca"))
            .json(&sca)
            .send()
            .await
            .unwrap();
        if unit(name).unwrap().sim.confirms() {
            assert_eq!(response.status(), 204, "{name}");
            let reply = apply(&clients, &decision, "sca").await;
            assert!(
                matches!(reply, Ok(Reply::NeedsConfirmation { .. })),
                "{name}: {reply:?}"
            );
        } else {
            assert_eq!(response.status(), 404, "{name}");
        }
        let bad = json!({"request_id": target, "auto": "maybe"});
        let response = client()
            .post(format!("{root}/_sim/{name}/sca"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name}");
    }
}

#[tokio::test]
async fn reset_forgets_targets_caches_and_counters() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    let decided: Vec<_> = providers()
        .iter()
        .map(|&unit| sample(unit, "reject"))
        .collect();
    for (decision, _) in &decided {
        apply(&clients, decision, "k").await.unwrap();
    }

    let response = client()
        .post(format!("{}/_sim/reset", sim.root_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    for (decision, target) in &decided {
        assert_eq!(sim.target_state(&decision.provider, target), None);
    }
    let stats = sim.stats();
    assert_eq!(stats.0.len(), providers().len());
    assert!(stats.0.values().all(|p| *p == ProviderStats::default()));
    // Targets and idempotency caches were cleared too: the same decision
    // under the same key meets a pending target and is applied afresh.
    for (decision, target) in &decided {
        let reply = apply(&clients, decision, "k").await;
        assert!(
            matches!(reply, Ok(Reply::Done { .. })),
            "{}: {reply:?}",
            decision.provider
        );
        assert!(sim.target_state(&decision.provider, target).is_some());
    }
    assert_eq!(sim.stats().total().state_changes, providers().len() as u64);
    assert_eq!(sim.stats().total().double_state_changes, 0);
}
