//! Reading back what a wiremock provider received, and scripted answers.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use wiremock::{MockServer, Request, Respond, ResponseTemplate};

/// Answers from a script, one per call (the last repeats), noting when each
/// call arrived.
#[derive(Clone)]
pub struct Script {
    replies: Arc<Vec<ResponseTemplate>>,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Script {
    pub fn new(replies: Vec<ResponseTemplate>) -> Self {
        Self {
            replies: Arc::new(replies),
            calls: Arc::default(),
        }
    }

    /// When each call arrived.
    pub fn times(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

impl Respond for Script {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let mut calls = self.calls.lock().unwrap();
        calls.push(Instant::now());
        let i = (calls.len() - 1).min(self.replies.len() - 1);
        self.replies[i].clone()
    }
}

/// Every request received so far.
pub async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap_or_default()
}

/// The POST requests received so far (decision calls, as opposed to reads).
pub async fn posts(server: &MockServer) -> Vec<Request> {
    with_method(server, "POST").await
}

pub async fn with_method(server: &MockServer, method: &str) -> Vec<Request> {
    requests(server)
        .await
        .into_iter()
        .filter(|r| r.method.as_str() == method)
        .collect()
}

/// The requests received on `path`.
pub async fn calls_to(server: &MockServer, path: &str) -> Vec<Request> {
    requests(server)
        .await
        .into_iter()
        .filter(|r| r.url.path() == path)
        .collect()
}

/// A request header as text.
pub fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}
