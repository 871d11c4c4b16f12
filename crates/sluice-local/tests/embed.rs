//! Sentence embeddings vs. the reference implementation.
//!
//! The model lives at `<workspace>/models/all-MiniLM-L6-v2` or `$SLUICE_MINILM_DIR`.
//! When it is absent the model tests print a skip notice and pass, unless
//! `SLUICE_REQUIRE_MODELS=1`, which makes them fail instead.
//!
//! The fixture `tests/fixtures/minilm_reference.json` was produced by
//! `scripts/make_embedding_reference.py` with the `sentence-transformers` package.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use sluice_local::embed::{EmbedError, Pooling, SentenceEmbedder};

const MIN_COSINE: f32 = 0.999;

fn model_dir() -> PathBuf {
    match std::env::var_os("SLUICE_MINILM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2"),
    }
}

/// Model tests run one at a time so the timings they print are not skewed by
/// each other (the machine has few cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn embedder() -> Option<(MutexGuard<'static, ()>, &'static SentenceEmbedder)> {
    static MODEL: OnceLock<Option<SentenceEmbedder>> = OnceLock::new();
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = MODEL.get_or_init(|| {
        let dir = model_dir();
        if !dir.join("model.safetensors").is_file() {
            let required = std::env::var("SLUICE_REQUIRE_MODELS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "SLUICE_REQUIRE_MODELS=1 but no model at {}",
                dir.display()
            );
            eprintln!(
                "SKIP: no embedding model at {} (set SLUICE_MINILM_DIR)",
                dir.display()
            );
            return None;
        }
        let start = Instant::now();
        let model = SentenceEmbedder::load(&dir).expect("load embedding model");
        eprintln!("loaded {} in {:?}", dir.display(), start.elapsed());
        Some(model)
    });
    model.as_ref().map(|m| (guard, m))
}

struct Reference {
    sentences: Vec<String>,
    token_counts: Vec<usize>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_reference.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read fixture"))
            .expect("parse fixture");
    let strings = |key: &str| -> Vec<String> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let reference = Reference {
        sentences: strings("sentences"),
        token_counts: json["token_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap() as usize)
            .collect(),
        embeddings: json["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
    };
    assert_eq!(reference.sentences.len(), reference.embeddings.len());
    assert_eq!(reference.sentences.len(), reference.token_counts.len());
    reference
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn short_label(s: &str) -> String {
    let s: String = s.chars().take(32).collect();
    format!("{s:?}")
}

#[test]
fn matches_reference_one_at_a_time_and_batched() {
    let Some((_guard, model)) = embedder() else {
        return;
    };
    let reference = reference();
    let texts: Vec<&str> = reference.sentences.iter().map(String::as_str).collect();

    // Warm up (first-call allocations, thread pool start).
    model.embed(&["warm up"]).unwrap();

    let mut min_single = f32::MAX;
    let mut single_ms = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let start = Instant::now();
        let (vectors, counts) = model.embed(&[text]).unwrap();
        single_ms.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(vectors.len(), 1);
        assert_eq!(
            counts,
            vec![reference.token_counts[i]],
            "token count of {}",
            short_label(text)
        );
        let cos = cosine(&vectors[0], &reference.embeddings[i]);
        eprintln!(
            "  single  cos={cos:.7} tokens={:>3} {:>7.2} ms  {}",
            counts[0],
            single_ms[i],
            short_label(text)
        );
        min_single = min_single.min(cos);
        assert!(
            cos >= MIN_COSINE,
            "single: cosine {cos} for {}",
            short_label(text)
        );
    }

    let start = Instant::now();
    let (vectors, counts) = model.embed(&texts).unwrap();
    let batch_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(vectors.len(), texts.len());
    assert_eq!(counts, reference.token_counts);
    let mut min_batch = f32::MAX;
    for (i, v) in vectors.iter().enumerate() {
        let cos = cosine(v, &reference.embeddings[i]);
        min_batch = min_batch.min(cos);
        assert!(
            cos >= MIN_COSINE,
            "batched: cosine {cos} for {}",
            short_label(texts[i])
        );
    }
    eprintln!(
        "min cosine vs reference: single {min_single:.7}, batched {min_batch:.7} ({} sentences)",
        texts.len()
    );
    eprintln!(
        "reference set: single {:.2} ms/sentence, batched {:.2} ms/sentence",
        single_ms.iter().sum::<f64>() / texts.len() as f64,
        batch_ms / texts.len() as f64
    );

    // Throughput on short sentences alone (the long reference texts dominate the above).
    let short: Vec<&str> = texts
        .iter()
        .zip(&reference.token_counts)
        .filter(|(_, n)| **n <= 32)
        .map(|(t, _)| *t)
        .collect();
    let rounds = 5;
    let start = Instant::now();
    for _ in 0..rounds {
        for text in &short {
            model.embed(&[text]).unwrap();
        }
    }
    let short_single = start.elapsed().as_secs_f64() * 1e3 / (rounds * short.len()) as f64;
    let start = Instant::now();
    for _ in 0..rounds {
        model.embed(&short).unwrap();
    }
    let short_batch = start.elapsed().as_secs_f64() * 1e3 / (rounds * short.len()) as f64;
    eprintln!(
        "short sentences (<= 32 tokens, n={}): single {short_single:.2} ms/sentence, batched {short_batch:.2} ms/sentence",
        short.len()
    );
}

#[test]
fn large_batches_are_split_and_keep_order() {
    let Some((_guard, model)) = embedder() else {
        return;
    };
    let reference = reference();
    // 70 inputs (> several sub-batches), mixed lengths, in a scrambled order.
    let n = reference.sentences.len();
    let picks: Vec<usize> = (0..70).map(|i| (i * 7 + 3) % n).collect();
    let texts: Vec<&str> = picks
        .iter()
        .map(|&i| reference.sentences[i].as_str())
        .collect();
    let (vectors, counts) = model.embed(&texts).unwrap();
    assert_eq!(vectors.len(), texts.len());
    let mut min = f32::MAX;
    for (k, &i) in picks.iter().enumerate() {
        assert_eq!(counts[k], reference.token_counts[i]);
        min = min.min(cosine(&vectors[k], &reference.embeddings[i]));
    }
    eprintln!("70-input batch: min cosine vs reference {min:.7}");
    assert!(min >= MIN_COSINE, "min cosine {min}");
    assert_eq!(model.embed(&[]).unwrap(), (vec![], vec![]));
}

#[test]
fn unit_length_dimensions_and_info() {
    let Some((_guard, model)) = embedder() else {
        return;
    };
    let info = model.info();
    assert_eq!(info.name, "all-MiniLM-L6-v2");
    assert_eq!(info.dimensions, 384);
    assert_eq!(info.max_tokens, 256);
    assert_eq!(info.pooling, Pooling::Mean);
    assert!(info.normalize);

    let reference = reference();
    let texts: Vec<&str> = reference.sentences.iter().map(String::as_str).collect();
    let (vectors, _) = model.embed(&texts).unwrap();
    for (v, text) in vectors.iter().zip(&texts) {
        assert_eq!(v.len(), 384);
        assert!(v.iter().all(|x| x.is_finite()));
        let n = norm(v);
        assert!((n - 1.0).abs() < 1e-4, "norm {n} for {}", short_label(text));
    }
}

#[test]
fn token_counts_and_truncation() {
    let Some((_guard, model)) = embedder() else {
        return;
    };
    let reference = reference();
    let longest = reference.sentences.last().unwrap();
    // count_tokens reports the untruncated length; embed() reports what it embedded.
    let full = model.count_tokens(longest).unwrap();
    assert!(
        full > 256,
        "fixture's last sentence should exceed 256 tokens: {full}"
    );
    let (_, counts) = model.embed(&[longest]).unwrap();
    assert_eq!(counts, vec![256]);
    assert_eq!(model.count_tokens("A man is eating food.").unwrap(), 8);
    assert_eq!(model.count_tokens("").unwrap(), 2); // [CLS] [SEP]

    // Everything past max_tokens is ignored: appending text to an already
    // truncated input does not change its vector.
    let longer = format!("{longest} And then something else entirely happened.");
    let (a, _) = model.embed(&[longest]).unwrap();
    let (b, _) = model.embed(&[&longer]).unwrap();
    assert!(cosine(&a[0], &b[0]) > 0.999_999);
}

#[test]
fn semantic_similarity_is_sane() {
    let Some((_guard, model)) = embedder() else {
        return;
    };
    let (v, _) = model
        .embed(&[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ])
        .unwrap();
    let close = cosine(&v[0], &v[1]);
    let far = cosine(&v[0], &v[2]);
    eprintln!("cos(food, bread) = {close:.4}, cos(food, baby) = {far:.4}");
    assert!(close > far, "{close} <= {far}");
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-embed-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    dir
}

/// A model directory with every small file but no weights. Only file presence
/// is checked before the weights, so stub contents are enough and this test
/// needs no model.
fn stub_model_dir(tag: &str) -> PathBuf {
    let dir = scratch_dir(tag);
    let files = [
        (
            "modules.json",
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        ),
        ("config.json", "{}"),
        ("tokenizer.json", "{}"),
        (
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension":384,"pooling_mode_mean_tokens":true}"#,
        ),
        ("sentence_bert_config.json", r#"{"max_seq_length":256}"#),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> EmbedError {
    match SentenceEmbedder::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_weights_error_names_the_file() {
    let dir = stub_model_dir("no-weights");
    let err = load_err(&dir);
    let msg = err.to_string();
    eprintln!("error: {msg}");
    assert!(matches!(err, EmbedError::MissingFile { .. }), "{err:?}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn other_missing_files_are_named() {
    for missing in [
        "modules.json",
        "config.json",
        "tokenizer.json",
        "1_Pooling/config.json",
    ] {
        let dir = stub_model_dir("missing");
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
        std::fs::remove_file(dir.join(missing)).unwrap();
        let msg = load_err(&dir).to_string();
        assert!(
            msg.contains(Path::new(missing).file_name().unwrap().to_str().unwrap()),
            "{missing}: {msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    let msg = load_err(Path::new("/nonexistent/sluice-model")).to_string();
    assert!(msg.contains("/nonexistent/sluice-model"), "{msg}");
}
