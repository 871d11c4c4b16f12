//! Every in-memory weight format gives a coherent greedy answer.

use std::path::PathBuf;

use sluice_local::llama::{LlamaModel, LoadOptions, TemplateMessage, WeightFormat, argmax};

fn model_path() -> Option<PathBuf> {
    let p = std::env::var("SLUICE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.is_file() {
        return Some(p);
    }
    assert_ne!(
        std::env::var("SLUICE_REQUIRE_MODELS").as_deref(),
        Ok("1"),
        "{} is required but missing",
        p.display()
    );
    eprintln!("SKIP: {} not found", p.display());
    None
}

fn greedy_answer(model: &LlamaModel, n: usize) -> String {
    let prompt = model
        .chat_template_or_default()
        .render(
            &[
                TemplateMessage::new("system", "You are a helpful assistant."),
                TemplateMessage::new("user", "What is the capital of France?"),
            ],
            true,
        )
        .unwrap();
    let tokens = model.tokenizer().encode(&prompt, false).unwrap();
    let mut cache = model.new_cache();
    let mut logits = model.prefill(&mut cache, &tokens).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits);
        out.push(t);
        logits = model.decode(&mut [(&mut cache, t)]).unwrap().remove(0);
    }
    model.tokenizer().decode(&out).unwrap()
}

#[test]
fn f32_and_q8_0_weights_answer_coherently() {
    let Some(path) = model_path() else { return };
    for weights in [WeightFormat::F32, WeightFormat::Q8_0] {
        let model = LlamaModel::load_with(&path, LoadOptions { weights }).unwrap();
        let answer = greedy_answer(&model, 8);
        assert!(answer.contains("Paris"), "{weights:?}: {answer}");
    }
}

/// With 8-bit weights (Sluice's batched kernel), a sequence's logits do not depend on what else
/// is in its batch: decoding two sequences together gives each the logits it gets alone.
#[test]
fn q8_0_batched_decode_matches_decoding_alone() {
    let Some(path) = model_path() else { return };
    let model = LlamaModel::load_with(
        &path,
        LoadOptions {
            weights: WeightFormat::Q8_0,
        },
    )
    .unwrap();
    let prompts = [
        "The capital of France is",
        "Rust is a programming language that",
    ];
    let tokens: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.tokenizer().encode(p, false).unwrap())
        .collect();
    let mut alone = Vec::new();
    for t in &tokens {
        let mut cache = model.new_cache();
        let logits = model.prefill(&mut cache, t).unwrap();
        let next = argmax(&logits);
        alone.push((
            next,
            model.decode(&mut [(&mut cache, next)]).unwrap().remove(0),
        ));
    }
    let mut caches: Vec<_> = tokens
        .iter()
        .map(|t| {
            let mut c = model.new_cache();
            model.prefill(&mut c, t).unwrap();
            c
        })
        .collect();
    let (a, b) = caches.split_at_mut(1);
    let together = model
        .decode(&mut [(&mut a[0], alone[0].0), (&mut b[0], alone[1].0)])
        .unwrap();
    for (i, (_, logits)) in alone.iter().enumerate() {
        let worst = logits
            .iter()
            .zip(&together[i])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-3,
            "sequence {i}: logits differ by {worst} in a batch"
        );
        assert_eq!(argmax(logits), argmax(&together[i]));
    }
}
