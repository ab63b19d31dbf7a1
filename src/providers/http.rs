//! What every provider's HTTP calls share: one pooled client, bounded body
//! reads, path-segment encoding, status classes and call metrics.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{
    RequestBuilder, StatusCode, Url,
    header::{HeaderMap, HeaderValue},
};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::{
    locks::{Semaphores, per_provider},
    outcome::bounded_copy,
    retry::{self, CallError, ErrorClass},
    settings::{SettingsError, WorkerSettings},
};

/// Answers larger than this are cut before they are parsed. We need only
/// their state and error fields; the bound leaves room for the largest
/// answers we read whole (a page of a provider's request list).
const MAX_BODY: usize = 256 * 1024;

/// Answers up to this size are read without waiting; nearly every answer
/// (an error, a single object) is far smaller.
const FREE_BODY: usize = 32 * 1024;

/// How many answers past [`FREE_BODY`] one provider's calls read at once.
/// Up to a prefetch's worth of calls are in flight together, and an answer
/// read at network speed also grows the HTTP client's own read buffer: were
/// a provider, a proxy's error page or a hostile endpoint to answer each of
/// them with megabytes, the worker's memory would grow with the prefetch.
/// Bounding the large reads bounds that memory, and per provider, so one
/// provider's large answers never hold up another's.
const LARGE_READS_PER_PROVIDER: usize = 8;

/// RFC 3986 unreserved characters stay; everything else is encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
    /// Concurrent calls allowed per provider (each a pooled connection).
    call_limit: Option<usize>,
    limits: Arc<Semaphores>,
    /// Per provider: permits to read an answer past [`FREE_BODY`].
    large_reads: Arc<Semaphores>,
}

#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Http {
    /// A client without a call limit, for tests.
    #[cfg(test)]
    pub fn new(timeout: Duration, connect_timeout: Duration) -> Result<Self, SettingsError> {
        Ok(Self {
            client: client(timeout, connect_timeout, 1024, false)?,
            call_limit: None,
            limits: Arc::default(),
            large_reads: Arc::default(),
        })
    }

    /// The worker's client. `max_calls_per_provider` caps concurrent calls
    /// per provider. Over HTTP/1 each call in flight holds a connection and
    /// its buffers, so this bounds memory under bursts (a full prefetch
    /// arriving at once) and spares the provider a connection storm; waiting
    /// calls queue in order. The pool keeps no more idle connections than
    /// that: a connection returns to the pool a moment after its call ends,
    /// so an unbounded pool drifts far above the call limit under load.
    pub fn from_settings(worker: &WorkerSettings) -> Result<Self, SettingsError> {
        let call_limit = worker.max_calls_per_provider.get();
        Ok(Self {
            client: client(
                worker.http_timeout,
                worker.connect_timeout,
                call_limit,
                worker.http2_prior_knowledge,
            )?,
            call_limit: Some(call_limit),
            limits: Arc::default(),
            large_reads: Arc::default(),
        })
    }

    fn permit_slot(&self, provider: &'static str) -> Option<Arc<Semaphore>> {
        let limit = self.call_limit?;
        Some(per_provider(&self.limits, provider, limit))
    }

    fn large_reads(&self, provider: &'static str) -> Arc<Semaphore> {
        per_provider(&self.large_reads, provider, LARGE_READS_PER_PROVIDER)
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends one request and reads its body as JSON (a non-JSON body becomes
    /// a JSON string). Transport failures become classified [`CallError`]s;
    /// HTTP error statuses are returned for the provider to interpret.
    pub async fn send(
        &self,
        provider: &'static str,
        operation: &'static str,
        request: RequestBuilder,
    ) -> Result<Response, CallError> {
        let slot = self.permit_slot(provider);
        let _permit = match &slot {
            Some(s) => Some(
                s.acquire()
                    .await
                    .expect("call-limit semaphores are never closed"),
            ),
            None => None,
        };
        let started = Instant::now();
        let result = self.send_inner(provider, operation, request).await;
        let class = match &result {
            Ok(r) => status_class(r.status),
            Err(_) => "transport",
        };
        metrics::histogram!(
            "approval_provider_call_duration_seconds",
            "provider" => provider,
            "operation" => operation,
            "status_class" => class,
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    async fn send_inner(
        &self,
        provider: &'static str,
        operation: &'static str,
        request: RequestBuilder,
    ) -> Result<Response, CallError> {
        // Built apart from sending, so that a request that cannot be built
        // is not mistaken for one lost in transit.
        let (client, request) = request.build_split();
        let request = request.map_err(|_| unbuildable(operation))?;
        let mut response = client
            .execute(request)
            .await
            .map_err(|e| CallError::from_transport(operation, &e))?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let announced = response
            .content_length()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let mut bytes = Vec::with_capacity(announced.unwrap_or(0).min(FREE_BODY));
        // A permit to read past FREE_BODY, held until the answer is parsed.
        let mut large_read = None;
        let mut cut = false;
        loop {
            // An announced large answer waits before its first chunk, when
            // the client has buffered little of it; another waits once it
            // turns out large.
            let large = bytes.len() >= FREE_BODY || announced.is_some_and(|n| n > FREE_BODY);
            if large && large_read.is_none() {
                let reads = self.large_reads(provider);
                large_read = Some(
                    reads
                        .acquire_owned()
                        .await
                        .expect("large-read semaphores are never closed"),
                );
            }
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_BODY.saturating_sub(bytes.len());
                    bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if room < chunk.len() {
                        cut = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(CallError::from_transport(operation, &e)),
            }
        }
        // The rest of a cut answer is not read: dropping the response closes
        // its connection.
        drop(response);
        let body = if bytes.is_empty() {
            Value::Null
        } else if cut {
            // A cut document cannot parse; keep its start as text.
            Value::String(text(bytes))
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(json) => json,
                Err(_) => Value::String(text(bytes)),
            }
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// The body as text, reusing its buffer unless it is not UTF-8.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A request reqwest refuses to build never left the worker, and retrying
/// cannot fix it: its header values (credentials among them) or URL come
/// from the configuration, and a header value with a control character is
/// the usual cause. It is reported as an auth failure, for the operator to
/// fix, and never quotes reqwest's error, whose source may hold the value.
fn unbuildable(operation: &str) -> CallError {
    CallError::new(
        ErrorClass::Auth,
        format!(
            "{operation} was not sent: the request could not be built from the configured \
             settings (is there a line break or another control character inside a credential?)"
        ),
    )
}

pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn client(
    timeout: Duration,
    connect_timeout: Duration,
    max_idle: usize,
    http2_prior_knowledge: bool,
) -> Result<reqwest::Client, SettingsError> {
    let builder = reqwest::Client::builder();
    let builder = if http2_prior_knowledge {
        builder.http2_prior_knowledge()
    } else {
        builder
    };
    builder
        .timeout(timeout)
        .connect_timeout(connect_timeout)
        // Decision calls must never be silently redirected elsewhere
        // (Qonto's sandbox answers 302 to its portal without the staging token).
        .redirect(reqwest::redirect::Policy::none())
        // Retries are the worker's decision (classes, budgets, reconciliation).
        .retry(reqwest::retry::never())
        .pool_max_idle_per_host(max_idle)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("approval-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(SettingsError::HttpClient)
}

/// Credential headers other than a bearer token (which goes through
/// [`RequestBuilder::bearer_auth`]): marked sensitive, so reqwest's and
/// hyper's debug output never prints them and HTTP/2 never indexes them.
pub trait SecretHeader {
    fn secret_header(self, name: &'static str, value: &str) -> Self;
}

impl SecretHeader for RequestBuilder {
    fn secret_header(self, name: &'static str, value: &str) -> Self {
        match HeaderValue::from_str(value) {
            Ok(mut value) => {
                value.set_sensitive(true);
                self.header(name, value)
            }
            // Left to reqwest to refuse when the request is built, which
            // `Http::send` reports as a configuration error.
            Err(_) => self.header(name, value),
        }
    }
}

/// Percent-encodes one path segment (already checked by validation).
pub fn segment(value: &str) -> String {
    utf8_percent_encode(value, SEGMENT).to_string()
}

/// `base` + `path`, where `path` starts with `/` and holds encoded segments.
/// The base may carry its own path (`https://host/v1`), which is kept.
pub fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}{}", base.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    url
}

/// The class an HTTP status gets at every provider; each provider's
/// `classify` overrides only the statuses and codes its documentation
/// gives another meaning.
pub fn default_class(status: StatusCode) -> ErrorClass {
    match status.as_u16() {
        // 420 is Ledger's rate-limit answer, kept wherever it is not overridden.
        420 | 429 | 500..=599 => ErrorClass::Retryable,
        // Refused credentials or rights: only an operator can fix them.
        401 | 403 => ErrorClass::Auth,
        // No provider documents an answer for "not pending any more"; it may
        // come as any of these, so the worker reads the state.
        400 | 409 | 422 => ErrorClass::Ambiguous,
        // Not found, or a status we do not expect: the call cannot pass as sent.
        _ => ErrorClass::Permanent,
    }
}

/// Builds the error for a non-success answer.
pub fn error(
    class: ErrorClass,
    response: &Response,
    provider_code: Option<String>,
    message: Option<String>,
) -> CallError {
    CallError {
        class,
        message: message
            .unwrap_or_else(|| format!("provider answered HTTP {}", response.status.as_u16())),
        http_status: Some(response.status.as_u16()),
        provider_code,
        retry_after: retry::retry_after(&response.headers),
        // Events echo at most this much; a full copy would only be dropped later.
        response: Some(bounded_copy(&response.body)),
    }
}

/// Every status a provider's table is checked at: each class boundary and
/// the statuses some provider documents.
#[cfg(test)]
pub(crate) const CHECKED_STATUSES: &[u16] = &[
    200, 204, 302, 400, 401, 403, 404, 405, 409, 410, 415, 418, 420, 422, 428, 429, 500, 501, 502,
    503, 504, 599,
];

/// The statuses of [`CHECKED_STATUSES`] (on an empty body) that `classify`
/// puts in another class than [`default_class`], so a provider's test pins
/// its overrides and nothing else.
#[cfg(test)]
pub(crate) fn overrides(classify: impl Fn(&Response) -> CallError) -> Vec<(u16, ErrorClass)> {
    CHECKED_STATUSES
        .iter()
        .filter_map(|&status| {
            let status = StatusCode::from_u16(status).expect("a valid status");
            let response = Response {
                status,
                headers: HeaderMap::new(),
                body: Value::Null,
            };
            let class = classify(&response).class;
            (class != default_class(status)).then_some((status.as_u16(), class))
        })
        .collect()
}

/// Builds `request` and checks that each named header is there and marked
/// sensitive.
#[cfg(test)]
pub(crate) fn assert_sensitive(request: RequestBuilder, names: &[&str]) {
    let request = request.build().expect("the request builds");
    for name in names {
        let value = request
            .headers()
            .get(*name)
            .unwrap_or_else(|| panic!("no {name} header"));
        assert!(value.is_sensitive(), "{name} is not marked sensitive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared table that every provider's overrides are checked against.
    #[test]
    fn shared_status_table() {
        use ErrorClass::{Ambiguous, Auth, Permanent, Retryable};
        let table: Vec<_> = CHECKED_STATUSES
            .iter()
            .map(|&s| (s, default_class(StatusCode::from_u16(s).unwrap())))
            .collect();
        let expected = vec![
            (200, Permanent),
            (204, Permanent),
            (302, Permanent),
            (400, Ambiguous),
            (401, Auth),
            (403, Auth),
            (404, Permanent),
            (405, Permanent),
            (409, Ambiguous),
            (410, Permanent),
            (415, Permanent),
            (418, Permanent),
            (420, Retryable),
            (422, Ambiguous),
            (428, Permanent),
            (429, Retryable),
            (500, Retryable),
            (501, Retryable),
            (502, Retryable),
            (503, Retryable),
            (504, Retryable),
            (599, Retryable),
        ];
        assert_eq!(table, expected);
    }

    fn http() -> Http {
        Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap()
    }

    /// A credential with a line break inside cannot go into a header: the
    /// call is refused for good, as a configuration error, without being
    /// sent and without quoting the value (it used to be "failed in
    /// transit", ambiguous, and retried until the horizon).
    #[tokio::test]
    async fn an_unbuildable_request_is_an_auth_failure_never_sent() {
        use wiremock::{Mock, MockServer, ResponseTemplate, matchers::any};
        let server = MockServer::start().await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        let http = http();
        let secret = "S3CRET-part\nS3CRET-rest";
        for request in [
            http.client()
                .post(server.uri())
                .secret_header("X-Api-Key", secret),
            http.client().post(server.uri()).bearer_auth(secret),
        ] {
            let e = http
                .send("test", "decision call", request)
                .await
                .unwrap_err();
            assert_eq!(e.class, ErrorClass::Auth, "{e}");
            assert!(e.message.starts_with("decision call was not sent"), "{e}");
            assert!(!format!("{e:?}").contains("S3CRET"), "{e:?}");
        }
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    /// A huge answer is cut to [`MAX_BODY`] before parsing, and the error
    /// built from it keeps no more than an outcome event echoes.
    #[tokio::test]
    async fn large_answers_are_cut_and_errors_keep_a_bounded_copy() {
        use crate::outcome::MAX_PROVIDER_RESPONSE_BYTES;
        use wiremock::{Mock, MockServer, ResponseTemplate, matchers::any};
        let server = MockServer::start().await;
        let huge = serde_json::json!({ "code": "oops", "detail": "x".repeat(900 * 1024) });
        Mock::given(any())
            .respond_with(ResponseTemplate::new(500).set_body_json(&huge))
            .mount(&server)
            .await;
        let http = http();
        let response = http
            .send("test", "call", http.client().get(server.uri()))
            .await
            .unwrap();
        let Value::String(text) = &response.body else {
            panic!("a cut answer is kept as text");
        };
        assert_eq!(text.len(), MAX_BODY);
        assert!(text.starts_with(r#"{"code":"oops""#), "{}", &text[..40]);

        let e = error(ErrorClass::Retryable, &response, None, None);
        let kept = serde_json::to_string(e.response.as_ref().unwrap()).unwrap();
        assert!(kept.len() <= MAX_PROVIDER_RESPONSE_BYTES, "{}", kept.len());

        // An answer within the bound is parsed whole as before.
        let small = serde_json::json!({ "status": "ok" });
        let response = Response {
            status: StatusCode::BAD_GATEWAY,
            headers: HeaderMap::new(),
            body: small.clone(),
        };
        let e = error(ErrorClass::Retryable, &response, None, None);
        assert_eq!(e.response, Some(small));
    }

    /// While one provider's large reads are all taken, its small answers
    /// and another provider's large ones are read at once; its own large
    /// answer is read once a read ends.
    #[tokio::test]
    async fn large_reads_are_bounded_per_provider() {
        use wiremock::{Mock, MockServer, ResponseTemplate, matchers::path};
        let server = MockServer::start().await;
        let large = "y".repeat(FREE_BODY * 3);
        for (route, body) in [("/small", "s".to_owned()), ("/large", large.clone())] {
            Mock::given(path(route))
                .respond_with(ResponseTemplate::new(200).set_body_string(body))
                .mount(&server)
                .await;
        }
        let http = http();
        let get = |route: &str| http.client().get(format!("{}{route}", server.uri()));
        let taken = http
            .large_reads("a")
            .acquire_many_owned(LARGE_READS_PER_PROVIDER as u32)
            .await
            .unwrap();
        let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
        let small = within(http.send("a", "read", get("/small"))).await;
        assert_eq!(small.unwrap().unwrap().body, "s");
        let other = within(http.send("b", "read", get("/large"))).await;
        assert_eq!(other.unwrap().unwrap().body, large.as_str());

        let waiting = tokio::spawn({
            let (http, request) = (http.clone(), get("/large"));
            async move { http.send("a", "read", request).await }
        });
        drop(taken);
        let own = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(own.body, large.as_str());
    }

    #[test]
    fn join_keeps_the_base_path_and_encodes_segments() {
        let base = Url::parse("https://api.example.com/v1").unwrap();
        let url = join(
            &base,
            &format!("/rest/requests/{}/reject", segment("a b?c")),
        );
        assert_eq!(
            url.as_str(),
            "https://api.example.com/v1/rest/requests/a%20b%3Fc/reject"
        );
        let base = Url::parse("https://api.example.com/").unwrap();
        assert_eq!(
            join(&base, "/v2/x").as_str(),
            "https://api.example.com/v2/x"
        );
    }
}
