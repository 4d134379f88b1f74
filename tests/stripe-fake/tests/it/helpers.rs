//! A small Stripe client and a webhook receiver for the tests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use reqwest::header::HeaderMap;
use serde_json::Value;
use stripe_fake::{Config, StripeFake};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const KEY: &str = "sk_test_integration";
pub const SECRET: &str = "whsec_integration_secret";
/// Generous: only reached when a test is failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub async fn start() -> StripeFake {
    start_with(Config {
        api_key: KEY.into(),
        ..Config::default()
    })
    .await
}

pub async fn start_with(config: Config) -> StripeFake {
    StripeFake::start(config).await.expect("the fake starts")
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub json: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn error(&self) -> &Value {
        &self.json["error"]
    }

    pub fn id(&self) -> String {
        self.json["id"].as_str().expect("an object id").to_owned()
    }
}

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub key: String,
}

impl Api {
    pub fn new(fake: &StripeFake) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: fake.base_url(),
            key: KEY.into(),
        }
    }

    pub async fn try_post(
        &self,
        path: &str,
        idempotency_key: Option<&str>,
        form: &[(&str, &str)],
    ) -> Result<Answer, reqwest::Error> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .form(form);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        answer(request.send().await?).await
    }

    pub async fn post(
        &self,
        path: &str,
        idempotency_key: Option<&str>,
        form: &[(&str, &str)],
    ) -> Answer {
        self.try_post(path, idempotency_key, form)
            .await
            .expect("an answer")
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Answer {
        let request = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .query(query);
        answer(request.send().await.expect("an answer"))
            .await
            .expect("a body")
    }

    pub async fn delete(&self, path: &str, idempotency_key: Option<&str>) -> Answer {
        let mut request = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        answer(request.send().await.expect("an answer"))
            .await
            .expect("a body")
    }

    /// A GET with a `Stripe-Version` header.
    pub async fn get_version(&self, path: &str, version: &str) -> Answer {
        let request = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("Stripe-Version", version);
        answer(request.send().await.expect("an answer"))
            .await
            .expect("a body")
    }

    /// A control endpoint, JSON in and out.
    pub async fn control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(&body).expect("json"));
        }
        answer(request.send().await.expect("an answer"))
            .await
            .expect("a body")
    }

    /// A PaymentIntent for `order_ref`, asserted created.
    pub async fn create(&self, amount: &str, order_ref: &str) -> Value {
        let answer = self
            .post(
                "/v1/payment_intents",
                None,
                &[
                    ("amount", amount),
                    ("currency", "usd"),
                    ("metadata[order_ref]", order_ref),
                ],
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.json);
        answer.json
    }
}

async fn answer(response: reqwest::Response) -> Result<Answer, reqwest::Error> {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await?;
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Answer {
        status,
        headers,
        json,
    })
}

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub signature: String,
    pub content_type: String,
    pub body: Bytes,
    pub json: Value,
}

/// A webhook endpoint that records deliveries and answers 200, or the statuses queued with
/// [`Receiver::answer_next`].
pub struct Receiver {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    answers: Arc<Mutex<VecDeque<u16>>>,
    count: watch::Receiver<usize>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/webhooks/stripe",
            listener.local_addr().expect("addr")
        );
        let received = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, count) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let (r, a) = (received.clone(), answers.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, a, tx) = (r.clone(), a.clone(), tx.clone());
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (r, a, tx) = (r.clone(), a.clone(), tx.clone());
                    async move {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        let (signature, content_type) =
                            (header("stripe-signature"), header("content-type"));
                        let body = request.into_body().collect().await?.to_bytes();
                        let status = a.lock().expect("lock").pop_front().unwrap_or(200);
                        if status == 200 {
                            let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let mut all = r.lock().expect("lock");
                            all.push(Received {
                                signature,
                                content_type,
                                body,
                                json,
                            });
                            tx.send_replace(all.len());
                        }
                        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                        *response.status_mut() =
                            hyper::StatusCode::from_u16(status).expect("status");
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Receiver {
            url,
            received,
            answers,
            count,
        }
    }

    /// The next deliveries get these statuses (and are not recorded unless 200).
    pub fn answer_next(&self, statuses: &[u16]) {
        self.answers.lock().expect("lock").extend(statuses);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits until at least `n` deliveries were accepted.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let mut count = self.count.clone();
        tokio::time::timeout(DEADLINE, count.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} deliveries expected, got {}", self.received().len()))
            .expect("receiver alive");
        self.received()
    }
}

/// The event types in delivery order.
pub fn types(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.json["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}
