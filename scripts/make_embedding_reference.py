#!/usr/bin/env python3
"""Generate the reference embeddings that sluice-local's embedding tests compare against.

Run once (the output is committed; CI does not run this):

    python3 -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers
    HF_HUB_OFFLINE=1 /tmp/st-venv/bin/python scripts/make_embedding_reference.py

It loads the model from models/all-MiniLM-L6-v2 with the reference implementation
(the `sentence-transformers` package, on CPU), embeds the sentences below and writes
crates/sluice-local/tests/fixtures/minilm_reference.json:

    {"model": "all-MiniLM-L6-v2", "generated_by": "sentence-transformers X.Y.Z",
     "max_seq_length": 256, "sentences": [...], "token_counts": [...],
     "embeddings": [[384 floats rounded to 7 decimals], ...]}

`token_counts` is the number of tokens each sentence is embedded from (special tokens
included, after truncation to max_seq_length).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentence_transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(os.environ.get("SLUICE_MINILM_DIR", ROOT / "models" / "all-MiniLM-L6-v2"))
OUT = ROOT / "crates" / "sluice-local" / "tests" / "fixtures" / "minilm_reference.json"

# Between 128 and 256 tokens: longer than the tokenizer.json's own truncation/padding
# length (128), shorter than the model's max_seq_length (256), so it must not be cut.
LONG = (
    "The river that gives the old mill town its name rises in the hills to the north, "
    "where snowmelt gathers in a chain of small lakes before spilling over a granite lip "
    "and tumbling through a narrow gorge. For two centuries the water turned wheels that "
    "ground grain, sawed timber and later spun cotton, and the town grew along its banks "
    "in a long, irregular ribbon of brick warehouses, workers' cottages and chapels. When "
    "the mills closed, one after another, the population fell by half within a generation, "
    "and many of the buildings stood empty for decades. Recently, however, a cooperative of "
    "local residents restored the largest mill as a small hydroelectric station, and the "
    "surrounding warehouses now hold a bakery, a bicycle workshop, a library and a school "
    "of traditional crafts that attracts students from across the region."
)

# Well over 256 tokens: the reference truncates it to max_seq_length, and so must we.
VERY_LONG = (
    "Distributed systems fail in ways that single machines do not. A request may reach a "
    "server, be processed, and have its reply lost on the way back, leaving the client "
    "unsure whether to retry. Clocks drift, so two nodes can disagree about which of two "
    "events happened first. A network partition can split a cluster into halves that each "
    "believe the other has crashed. Engineers respond to these problems with a toolbox of "
    "techniques: idempotent operations that are safe to repeat, logical clocks and version "
    "vectors that order events without trusting wall time, consensus protocols such as Paxos "
    "and Raft that let a majority agree on a single history, and timeouts paired with "
    "exponential backoff and jitter so that retries do not synchronize into a thundering herd. "
    "Observability matters just as much: structured logs, metrics with sensible cardinality "
    "and traces that follow a request across service boundaries turn a mysterious outage into "
    "a sequence of explainable steps. Testing, too, has to change. Unit tests rarely exercise "
    "the interleavings that cause trouble, so teams add fault injection, chaos experiments, "
    "deterministic simulation and model checking of the protocol itself. None of these "
    "removes failure; they make it visible, bounded and recoverable. The most reliable "
    "systems are not those that never break, but those whose operators understand exactly "
    "how they break, have rehearsed the recovery, and have designed every component so that "
    "a single fault degrades service gracefully instead of cascading through the whole "
    "platform. Capacity planning, load shedding, circuit breakers and careful rollout "
    "procedures with automatic rollback complete the picture, because most large incidents "
    "begin with a change that somebody deployed on an ordinary afternoon."
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Hello!",
    "Wait... what?!? (Really) -- yes: it's #1; 100% sure & done.",
    "Café crème brûlée at the naïve façade in Ærøskøbing.",
    "今天天气很好，我们去公园散步吧。",
    "I love pizza 🍕🔥 so much 😂👍🏽",
    " ",
    'fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!("{v:?}"); }',
    "THE Quick BROWN fox Jumps over the lazy dog",
    LONG,
    VERY_LONG,
]


def main() -> int:
    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    max_len = model.max_seq_length
    features = model.tokenize(SENTENCES)
    token_counts = [int(n) for n in features["attention_mask"].sum(dim=1).tolist()]
    untruncated = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    assert any(128 < n <= max_len for n in untruncated), untruncated
    assert any(n > max_len for n in untruncated), untruncated

    vectors = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    out = {
        "model": MODEL_DIR.name,
        "generated_by": f"sentence-transformers {sentence_transformers.__version__}",
        "max_seq_length": max_len,
        "sentences": SENTENCES,
        "token_counts": token_counts,
        "embeddings": [[round(float(x), 7) for x in row] for row in vectors],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One vector per line keeps the file small and diffs readable.
    lines = ",\n    ".join(json.dumps(row) for row in out.pop("embeddings"))
    head = json.dumps(out, ensure_ascii=False, indent=2)[:-2]
    OUT.write_text(f'{head},\n  "embeddings": [\n    {lines}\n  ]\n}}\n', encoding="utf-8")
    json.loads(OUT.read_text(encoding="utf-8"))  # sanity: valid JSON
    print(f"wrote {OUT} ({len(SENTENCES)} sentences, dim {vectors.shape[1]})")
    print("untruncated token counts:", untruncated)
    print("embedded token counts:   ", token_counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
