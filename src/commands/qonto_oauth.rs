//! `approval-worker qonto-oauth login|status` (CONTRACT v2 section 1).
//!
//! `login` runs Qonto's authorization-code flow once: it prints the
//! authorization URL, serves the configured redirect URI for one redirect,
//! checks `state`, exchanges the code and writes the pair into the token
//! store as the next generation (which also heals a revoked grant in every
//! running worker). `status` prints the store's state without any secret.

use std::{collections::HashMap, net::SocketAddr, process::ExitCode, time::Duration};

use axum::{Router, extract::Query, response::Html, routing::get};
use secrecy::ExposeSecret;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::{
    providers::{
        http::Http,
        qonto::{
            self,
            oauth::{
                OAuthConfig, UNUSABLE_REREAD, refresh::Grant, rfc3339, store::Record, store_login,
            },
        },
    },
    settings::Settings,
};

#[derive(clap::Subcommand)]
pub enum QontoOAuth {
    /// Run the authorization-code flow once and store the token pair.
    Login(LoginArgs),
    /// Print the token store's state (expiry, generation, last refresh), no secret.
    Status,
}

#[derive(clap::Args)]
pub struct LoginArgs {
    /// Give up when no redirect has arrived after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    timeout_s: u64,
}

pub async fn run(settings: Settings, command: QontoOAuth) -> ExitCode {
    let config = match qonto::oauth_config(&settings.providers) {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!(
                "qonto-oauth: no OAuth client configured: set APPROVAL_PROVIDERS__QONTO__OAUTH__CLIENT_ID and APPROVAL_PROVIDERS__QONTO__OAUTH__CLIENT_SECRET"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("qonto-oauth: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match command {
        QontoOAuth::Login(args) => login(&settings, &config, args).await,
        QontoOAuth::Status => status(&config).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("qonto-oauth: {problem}");
            ExitCode::FAILURE
        }
    }
}

/// The authorization URL for `state`.
fn authorization_url(config: &OAuthConfig, state: &str) -> reqwest::Url {
    let mut url = config.auth_url.clone();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", config.client_id.expose_secret())
        .append_pair("redirect_uri", config.redirect_uri.as_str())
        .append_pair("scope", &config.scopes)
        .append_pair("state", state);
    url
}

/// What the redirect brought: the code, or why there is none.
type Redirect = Result<String, String>;

async fn login(settings: &Settings, config: &OAuthConfig, args: LoginArgs) -> Result<(), String> {
    let store = config.store().map_err(|e| e.to_string())?;
    let redirect = &config.redirect_uri;
    let host = redirect.host_str().unwrap_or("127.0.0.1");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let port = redirect.port_or_known_default().unwrap_or(80);
    let bind: SocketAddr = format!("{host}:{port}")
        .parse()
        .or_else(|_| format!("[{host}]:{port}").parse())
        .map_err(|_| {
            format!(
                "APPROVAL_PROVIDERS__QONTO__OAUTH__REDIRECT_URI must name a local address (an IP or localhost) to listen on, got host {host}"
            )
        })?;
    // Listening before the URL is printed: the browser may be quick.
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| format!("cannot listen on {bind} for the redirect: {e}"))?;
    let state = hex::encode(rand::random::<[u8; 16]>());
    let (tx, mut rx) = mpsc::channel::<Redirect>(1);
    let expected = state.clone();
    let path = match redirect.path() {
        "" => "/".to_owned(),
        p => p.to_owned(),
    };
    let app = Router::new().route(
        &path,
        get(move |Query(q): Query<HashMap<String, String>>| {
            let (tx, expected) = (tx.clone(), expected.clone());
            async move {
                let result = received(&q, &expected);
                let page = match &result {
                    Ok(_) => "<h1>Qonto access granted</h1><p>approval-worker stores the tokens; you may close this page.</p>".to_owned(),
                    Err(why) => format!("<h1>Qonto authorization failed</h1><p>{}</p>", html_escape(why)),
                };
                let _ = tx.try_send(result);
                Html(page)
            }
        }),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
    });
    println!("Open this URL in a browser and consent to the access:");
    println!("{}", authorization_url(config, &state));
    println!(
        "Waiting up to {} s for the redirect to {redirect} ...",
        args.timeout_s
    );
    let got = tokio::time::timeout(Duration::from_secs(args.timeout_s), rx.recv()).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let code = match got {
        Err(_) => return Err(format!("no redirect arrived within {} s", args.timeout_s)),
        Ok(None) => return Err("the redirect listener stopped".to_owned()),
        Ok(Some(r)) => r?,
    };
    let http = Http::from_settings(&settings.worker).map_err(|e| e.to_string())?;
    let issued = config
        .endpoint(&http)
        .exchange(Grant::Code {
            code: &code,
            redirect_uri: config.redirect_uri.as_str(),
        })
        .await
        .map_err(|e| format!("the code could not be exchanged: {}", e.message()))?;
    let record = store_login(store.as_ref(), issued)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "Stored token pair generation {} in {}; the access token is valid until {}.",
        record.generation,
        store.describe(),
        rfc3339(record.access_expires_at)
    );
    println!(
        "Running workers pick it up within {} s.",
        UNUSABLE_REREAD.as_secs()
    );
    Ok(())
}

/// The code of a redirect, checked against `state`.
fn received(q: &HashMap<String, String>, state: &str) -> Redirect {
    if let Some(error) = q.get("error") {
        let description = q.get("error_description").map_or("", String::as_str);
        return Err(format!(
            "the authorization was refused: {} {}",
            clip(error),
            clip(description)
        ));
    }
    if q.get("state").map(String::as_str) != Some(state) {
        return Err("the redirect's state does not match this login (a stale or forged redirect); nothing was stored".to_owned());
    }
    match q.get("code") {
        Some(code) if !code.is_empty() && code.len() <= 2048 => Ok(code.clone()),
        _ => Err("the redirect carries no code".to_owned()),
    }
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn status(config: &OAuthConfig) -> Result<(), String> {
    let store = config.store().map_err(|e| e.to_string())?;
    println!("store: {}", store.describe());
    let record = store.load().await.map_err(|e| e.to_string())?;
    let Some(record) = record else {
        println!("state: empty");
        return Err(
            "the token store holds no token pair: run `approval-worker qonto-oauth login`"
                .to_owned(),
        );
    };
    print!(
        "{}",
        describe(&record, config.refresh_at, OffsetDateTime::now_utc())
    );
    match record.revoked_at {
        Some(at) => Err(format!(
            "the grant was revoked at {}: run `approval-worker qonto-oauth login`",
            rfc3339(at)
        )),
        None => Ok(()),
    }
}

/// The record's state as `status` prints it: times and names, no token.
pub(crate) fn describe(record: &Record, refresh_at: f64, now: OffsetDateTime) -> String {
    let left = (record.access_expires_at - now).whole_seconds();
    let expiry = if left > 0 {
        format!(
            "valid until {} (in {left} s)",
            rfc3339(record.access_expires_at)
        )
    } else {
        format!("expired at {}", rfc3339(record.access_expires_at))
    };
    let state = match record.revoked_at {
        Some(at) => format!("revoked at {} (run qonto-oauth login)", rfc3339(at)),
        None => "usable".to_owned(),
    };
    format!(
        "generation: {}\naccess token: {expiry}\nrefresh due: {}\nlast refresh: {} by {}\nstate: {state}\n",
        record.generation,
        rfc3339(record.refresh_due(refresh_at)),
        rfc3339(record.refreshed_at),
        record.refreshed_by,
    )
}

/// `check`'s line on the token store: reachable and usable, or why not.
pub(crate) async fn check_store(config: &OAuthConfig) -> Result<String, String> {
    let store = config.store().map_err(|e| e.to_string())?;
    match store.load().await.map_err(|e| e.to_string())? {
        Some(r) if r.revoked_at.is_some() => Err(format!(
            "qonto oauth: the grant in {} was revoked: run `approval-worker qonto-oauth login`",
            store.describe()
        )),
        Some(r) => Ok(format!(
            "qonto oauth: token store {} reachable (generation {}, last refresh {})",
            store.describe(),
            r.generation,
            rfc3339(r.refreshed_at)
        )),
        None if config.seed.is_some() => Ok(format!(
            "qonto oauth: token store {} reachable and empty (seeded from APPROVAL_PROVIDERS__QONTO__OAUTH__REFRESH_TOKEN on first use)",
            store.describe()
        )),
        None => Err(format!(
            "qonto oauth: token store {} holds no token pair: run `approval-worker qonto-oauth login`",
            store.describe()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::qonto::oauth::store::sample;

    #[test]
    fn the_redirect_must_carry_this_logins_state() {
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(
            received(&q(&[("code", "c1"), ("state", "s1")]), "s1"),
            Ok("c1".to_owned())
        );
        assert!(received(&q(&[("code", "c1"), ("state", "s2")]), "s1").is_err());
        assert!(received(&q(&[("code", "c1")]), "s1").is_err());
        assert!(received(&q(&[("error", "access_denied"), ("state", "s1")]), "s1").is_err());
    }

    #[test]
    fn status_holds_no_token() {
        let record = sample(7, 60);
        let text = describe(&record, 0.8, OffsetDateTime::now_utc());
        assert!(text.contains("generation: 7"), "{text}");
        assert!(
            !text.contains("access-7") && !text.contains("refresh-7"),
            "{text}"
        );
    }
}
