//! An open-loop latency probe for the overhead benchmark: `CONNECTIONS` workers send chat
//! completion requests on a fixed schedule that adds up to `RATE` requests per second, for
//! `SECONDS`, and the probe prints the latency percentiles, measured from sending the request to
//! the last byte of the answer. (The schedule runs on tokio's millisecond timer, so send times
//! jitter by up to a millisecond; measuring from the scheduled time would add that jitter to
//! every sample.) `late` counts requests sent more than 5 ms after their slot: a sign the
//! machine could not carry the offered load.
//!
//! Unlike a closed-loop tool at saturation (wrk), this measures what a gateway adds to a request
//! at a load the machine can carry.
//!
//! ```sh
//! cargo run --release -p sluice-testkit --example latency_probe -- URL RATE CONNECTIONS SECONDS [stream]
//! ```
//! Output: one line, `sent=N errors=E late=L p50_us=… p90_us=… p99_us=… p999_us=… max_us=…`.

use std::time::{Duration, Instant};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: latency_probe URL RATE CONNECTIONS SECONDS [stream]";
    let (Some(url), Some(rate), Some(conns), Some(secs)) = (
        args.first().cloned(),
        args.get(1).and_then(|v| v.parse::<f64>().ok()),
        args.get(2).and_then(|v| v.parse::<usize>().ok()),
        args.get(3).and_then(|v| v.parse::<f64>().ok()),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let stream = args.get(4).is_some_and(|a| a == "stream");
    if !(rate > 0.0 && conns > 0 && secs > 0.0) {
        eprintln!("{usage}\nRATE, CONNECTIONS and SECONDS must be positive");
        std::process::exit(2);
    }
    let body = format!(
        r#"{{"model":"bench-model","stream":{stream},"messages":[{{"role":"user","content":"Hello, how are you?"}}]}}"#
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .build()
        .expect("HTTP client");
    // Each worker sends every `gap`, offset so the workers interleave evenly.
    let gap = Duration::from_secs_f64(conns as f64 / rate);
    let per_worker = ((secs * rate) / conns as f64).floor() as usize;
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for w in 0..conns {
        let client = client.clone();
        let url = url.clone();
        let body = body.clone();
        let offset = gap.mul_f64(w as f64 / conns as f64);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_worker);
            let mut errors = 0usize;
            let mut late = 0usize;
            for i in 0..per_worker {
                let due = start + offset + gap.mul_f64(i as f64);
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                let sent = Instant::now();
                if sent.duration_since(due) > Duration::from_millis(5) {
                    late += 1;
                }
                let ok = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) => {
                        let good = r.status().is_success();
                        good && r.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    lat.push(sent.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (lat, errors, late)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut late = 0;
    for t in tasks {
        if let Ok((lat, e, l)) = t.await {
            all.extend(lat);
            errors += e;
            late += l;
        }
    }
    all.sort_unstable();
    println!(
        "sent={} errors={} late={} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        all.len() + errors,
        errors,
        late,
        percentile(&all, 50.0),
        percentile(&all, 90.0),
        percentile(&all, 99.0),
        percentile(&all, 99.9),
        all.last().copied().unwrap_or(0)
    );
}
