"""CPU baseline: llama.cpp (via llama-cpp-python) on the same GGUF that Sluice runs in-process.

Command (from the repository root; the venv holds a CPU-only, -march=native build of llama.cpp):

    /tmp/llama-venv/bin/python scripts/bench_llamacpp.py \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2

The model is loaded with llama_cpp.Llama(model_path, n_ctx=2048, n_threads=N, n_batch=512,
verbose=False, seed=0). Sampling is greedy (temperature 0) throughout and end-of-sequence is never
checked, so every run generates exactly the requested number of tokens. Before each measurement
one untimed warm-up run is made. Every run starts from an empty KV cache (llm.reset(); eval() then
drops every cached position from 0 on).

Measured (one JSON object per line on stdout, fields engine, version, threads, metric, value, unit,
plus the raw per-run samples under "runs"):

  ttft_200_token_prompt_median / _min  (ms, 5 runs)
      Wall time to evaluate a prompt of exactly 200 tokens and sample the first token greedily.
      The prompt is the same one Sluice's engine_bench uses: the river text below, repeated twice,
      tokenized without BOS or special tokens, first 200 tokens.
  decode_128_tokens_per_s  (tokens/s, median of 3 runs)
      After a short chat prompt is evaluated and its first token sampled (not timed), 128 decode
      steps are timed; each step evaluates the previous token (one forward pass over 1 token) and
      samples the next one greedily. Value = 128 / time of those steps. Prompt time is excluded.
  single_stream_wall_tokens_per_s  (tokens/s, median of 3 runs)
      Same definition as the concurrency-1, batching-off line of Sluice's
      `cargo run --release -p sluice-local --example engine_bench`: the chat-wrapped
      "Continue this story: <text>" prompt, 64 generated tokens (--tokens), tokens divided by the
      wall time of the whole request, prompt evaluation included.

llama.cpp has no continuous batching through this API, so only single-stream numbers are reported.
"""

import argparse
import json
import statistics
import sys
import time

import llama_cpp

# Identical to TEXT in crates/sluice-local/examples/engine_bench.rs.
TEXT = (
    "The river starts high in the mountains, where snow melts in the spring sun and runs "
    "down through narrow valleys of stone and pine. It gathers streams from every side, grows wide and slow "
    "across the plain, feeds farms and towns, carries boats and stories, and finally reaches the sea, where "
    "its fresh water mixes with the salt of the ocean and the tides carry it away. People have lived along "
    "its banks for thousands of years, building bridges, mills and harbours, and every generation has told "
    "the same river a different story about where it came from and where it was going. Engineers measure "
    "its flow, poets describe its colour, and children throw stones into it to watch the rings spread out "
    "across the surface until they vanish against the far bank under the willows."
)

SHORT_PROMPT = "<|im_start|>user\nTell me a long story about a river.<|im_end|>\n<|im_start|>assistant\n"


def tokenize(llm, text):
    # Like Sluice's tok.encode(text, false): no BOS; chat markers are parsed as special tokens.
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def prefill_and_first_token(llm, prompt):
    """Evaluates `prompt` from an empty cache and samples one token greedily; returns it."""
    llm.reset()
    llm.eval(prompt)
    return llm.sample(temp=0.0)


def time_ttft(llm, prompt):
    t0 = time.perf_counter()
    prefill_and_first_token(llm, prompt)
    return time.perf_counter() - t0


def time_decode(llm, prompt, n):
    """Seconds for `n` greedy decode steps after `prompt` (prompt evaluation not timed)."""
    tok = prefill_and_first_token(llm, prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
    return time.perf_counter() - t0


def time_request(llm, prompt, n):
    """Wall seconds for a whole request producing `n` tokens (prefill + first token + n-1 steps)."""
    t0 = time.perf_counter()
    tok = prefill_and_first_token(llm, prompt)
    for _ in range(n - 1):
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request for single_stream_wall")
    args = ap.parse_args()

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=2048,
        n_threads=args.threads,
        n_batch=512,
        verbose=False,
        seed=0,
    )

    def emit(metric, value, unit, runs, **extra):
        rec = {
            "engine": "llama.cpp",
            "version": llama_cpp.__version__,
            "threads": args.threads,
            "metric": metric,
            "value": round(value, 2),
            "unit": unit,
            "runs": [round(r, 2) for r in runs],
        }
        rec.update(extra)
        print(json.dumps(rec), flush=True)

    # a. Time to first token, prompt of exactly 200 tokens.
    long = tokenize(llm, f"{TEXT} {TEXT}")
    prompt200 = long[:200]
    if len(prompt200) != 200:
        sys.exit(f"text too short: {len(long)} tokens")
    time_ttft(llm, prompt200)  # warm-up
    ttft_ms = [time_ttft(llm, prompt200) * 1e3 for _ in range(5)]
    emit("ttft_200_token_prompt_median", statistics.median(ttft_ms), "ms", ttft_ms, prompt_tokens=200)
    emit("ttft_200_token_prompt_min", min(ttft_ms), "ms", ttft_ms, prompt_tokens=200)

    # b. Decode speed, prompt excluded.
    short = tokenize(llm, SHORT_PROMPT)
    n = args.decode_tokens
    time_decode(llm, short, 8)  # warm-up
    tps = [n / time_decode(llm, short, n) for _ in range(3)]
    emit("decode_%d_tokens_per_s" % n, statistics.median(tps), "tokens/s", tps,
         prompt_tokens=len(short), generated=n)

    # Sluice engine_bench-compatible single stream (prompt time included).
    words = TEXT.split()
    chat = tokenize(llm, f"<|im_start|>user\nContinue this story: {' '.join(words)}<|im_end|>\n<|im_start|>assistant\n")
    time_request(llm, chat, 4)  # warm-up
    wall = [args.tokens / time_request(llm, chat, args.tokens) for _ in range(3)]
    emit("single_stream_wall_tokens_per_s", statistics.median(wall), "tokens/s", wall,
         prompt_tokens=len(chat), generated=args.tokens)


if __name__ == "__main__":
    main()
