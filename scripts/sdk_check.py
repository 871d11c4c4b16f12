#!/usr/bin/env python3
"""Drop-in compatibility check of a running Sluice gateway against the official Python SDKs.

Usage:  pip install openai anthropic
        python scripts/sdk_check.py [BASE_URL]      # default http://127.0.0.1:4141

The gateway must serve the embedded default (model `mock-echo`, the mock provider that echoes the
last user message, words are tokens, `[mock:error=503]` / `[mock:error=429]` inject upstream
failures). Prints one PASS/FAIL line per check and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import anthropic
import openai

MODEL = "mock-echo"
RESULTS: list[tuple[str, bool, str]] = []


class CheckFailed(Exception):
    pass


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def check(name: str):
    def deco(fn):
        def run(*args, **kwargs):
            try:
                detail = fn(*args, **kwargs) or ""
                RESULTS.append((name, True, detail))
                print(f"PASS {name}: {detail}", flush=True)
            except CheckFailed as e:
                RESULTS.append((name, False, str(e)))
                print(f"FAIL {name}: {e}", flush=True)
            except Exception as e:  # noqa: BLE001 - report anything the SDK raised
                detail = f"{type(e).__name__}: {e}"
                body = getattr(e, "body", None)
                resp = getattr(e, "response", None)
                if resp is not None:
                    try:
                        detail += f" | status={resp.status_code} body={resp.text[:500]!r}"
                    except Exception:  # noqa: BLE001
                        pass
                elif body is not None:
                    detail += f" | body={body!r}"
                tb = traceback.format_exc().strip().splitlines()
                detail += f" | at {tb[-3].strip() if len(tb) >= 3 else ''}"
                RESULTS.append((name, False, detail))
                print(f"FAIL {name}: {detail}", flush=True)

        run.__name__ = fn.__name__
        return run

    return deco


def usage_ok(u, prompt: int | None = None, completion: int | None = None) -> None:
    expect(u is not None, "usage missing")
    expect(isinstance(u.prompt_tokens, int) and isinstance(u.completion_tokens, int), f"usage not ints: {u}")
    expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"total_tokens mismatch: {u}")
    if prompt is not None:
        expect(u.prompt_tokens == prompt, f"prompt_tokens={u.prompt_tokens}, expected {prompt}")
    if completion is not None:
        expect(u.completion_tokens == completion, f"completion_tokens={u.completion_tokens}, expected {completion}")


# --------------------------------------------------------------------------------------- OpenAI


def openai_checks(base: str) -> None:
    client = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="sdk-check", max_retries=0, timeout=30)

    @check("openai.chat.create")
    def chat_plain():
        text = "hello through sluice"
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
        expect(r.choices and r.choices[0].message.content == text, f"content={r.choices[0].message.content!r}")
        expect(r.choices[0].message.role == "assistant", f"role={r.choices[0].message.role!r}")
        expect(r.choices[0].finish_reason == "stop", f"finish_reason={r.choices[0].finish_reason!r}")
        expect(isinstance(r.id, str) and r.id, f"id={r.id!r}")
        expect(r.object == "chat.completion", f"object={r.object!r}")
        usage_ok(r.usage, completion=3)
        return f"id={r.id} usage={r.usage.prompt_tokens}/{r.usage.completion_tokens}/{r.usage.total_tokens}"

    @check("openai.chat.create with_raw_response (x-sluice-request-id)")
    def chat_raw():
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "raw please"}],
            user="alice",
        )
        rid = raw.headers.get("x-sluice-request-id")
        expect(bool(rid), f"x-sluice-request-id missing; headers={dict(raw.headers)}")
        r = raw.parse()
        expect(r.choices[0].message.content == "raw please", f"content={r.choices[0].message.content!r}")
        return f"x-sluice-request-id={rid} cost={raw.headers.get('x-sluice-cost-usd')}"

    @check("openai.chat.stream include_usage")
    def chat_stream_usage():
        text = "one token at a time"
        stream = client.chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": text}],
        )
        parts, usage, finish, n, ids = [], None, None, 0, set()
        for chunk in stream:
            n += 1
            ids.add(chunk.id)
            if chunk.usage is not None:
                expect(not chunk.choices, f"usage chunk has choices: {chunk}")
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta and c.delta.content:
                    parts.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        got = "".join(parts)
        expect(got == text, f"concatenated={got!r}")
        expect(finish == "stop", f"finish_reason={finish!r}")
        expect(len(ids) == 1, f"chunk ids differ: {ids}")
        usage_ok(usage, completion=5)
        return f"{n} chunks, usage={usage.prompt_tokens}/{usage.completion_tokens}/{usage.total_tokens}"

    @check("openai.chat.stream without include_usage")
    def chat_stream_plain():
        text = "no usage here please"
        stream = client.chat.completions.create(
            model=MODEL, stream=True, messages=[{"role": "user", "content": text}]
        )
        parts, n, usage_seen = [], 0, False
        for chunk in stream:
            n += 1
            if chunk.usage is not None:
                usage_seen = True
            for c in chunk.choices:
                if c.delta and c.delta.content:
                    parts.append(c.delta.content)
        got = "".join(parts)
        expect(got == text, f"concatenated={got!r}")
        expect(not usage_seen, "a usage chunk was sent although include_usage was not requested")
        return f"{n} chunks"

    @check("openai.chat.stream with_raw_response header")
    def chat_stream_raw():
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, stream=True, messages=[{"role": "user", "content": "hdr"}]
        ) as resp:
            rid = resp.headers.get("x-sluice-request-id")
            ctype = resp.headers.get("content-type", "")
            for _ in resp.parse():
                pass
        expect(bool(rid), "x-sluice-request-id missing on the stream")
        expect(ctype.startswith("text/event-stream"), f"content-type={ctype!r}")
        return f"x-sluice-request-id={rid} content-type={ctype}"

    def emb_common(r, n_inputs):
        expect(len(r.data) == n_inputs, f"{len(r.data)} vectors for {n_inputs} inputs")
        dims = {len(d.embedding) for d in r.data}
        expect(len(dims) == 1 and dims != {0}, f"vector lengths {dims}")
        for d in r.data:
            expect(isinstance(d.embedding, list) and all(isinstance(x, float) for x in d.embedding),
                   f"embedding not list[float]: {type(d.embedding).__name__} {str(d.embedding)[:80]}")
        expect([d.index for d in r.data] == list(range(n_inputs)), f"indices {[d.index for d in r.data]}")
        expect(r.usage is not None and r.usage.prompt_tokens >= 0, f"usage={r.usage}")
        return f"{len(r.data)}x{dims.pop()} usage.prompt_tokens={r.usage.prompt_tokens} model={r.model}"

    @check("openai.embeddings.create (default = base64)")
    def emb_default():
        r = client.embeddings.create(model=MODEL, input=["alpha beta", "gamma"])
        return emb_common(r, 2)

    @check("openai.embeddings.create encoding_format=float")
    def emb_float():
        r = client.embeddings.create(model=MODEL, input="alpha beta", encoding_format="float")
        detail = emb_common(r, 1)
        r2 = client.embeddings.create(model=MODEL, input="alpha beta")
        expect(all(abs(a - b) < 1e-6 for a, b in zip(r.data[0].embedding, r2.data[0].embedding)),
               "float and base64 vectors differ for the same input")
        return detail + " (matches base64 decode)"

    @check("openai.models.list")
    def models_list():
        ms = list(client.models.list())
        ids = [m.id for m in ms]
        expect(MODEL in ids, f"ids={ids}")
        return f"ids={ids}"

    @check("openai.models.retrieve")
    def models_retrieve():
        m = client.models.retrieve(MODEL)
        expect(m.id == MODEL and m.object == "model", f"{m}")
        return f"id={m.id} owned_by={m.owned_by}"

    @check("openai error: unknown model -> NotFoundError")
    def err_unknown():
        try:
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        except openai.NotFoundError as e:
            expect(e.status_code == 404, f"status={e.status_code}")
            expect(e.code == "model_not_found", f"code={e.code!r} body={e.body!r}")
            return f"404 code={e.code} message={e.message!r}"
        raise CheckFailed("no exception")

    @check("openai error: unknown model (models.retrieve) -> NotFoundError")
    def err_unknown_retrieve():
        try:
            client.models.retrieve("no-such-model")
        except openai.NotFoundError as e:
            return f"404 code={e.code}"
        raise CheckFailed("no exception")

    @check("openai error: [mock:error=503] -> APIStatusError 502")
    def err_503():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fail [mock:error=503]"}])
        except openai.APIStatusError as e:
            expect(e.status_code == 502, f"status={e.status_code} body={e.body!r}")
            expect(e.response.headers.get("x-sluice-request-id"), "no x-sluice-request-id on the error")
            expect(isinstance(e.body, dict) and e.message, f"body={e.body!r}")
            return f"502 {type(e).__name__} message={e.message!r}"
        raise CheckFailed("no exception")

    @check("openai error: [mock:error=503] while streaming -> APIStatusError 502")
    def err_503_stream():
        try:
            for _ in client.chat.completions.create(
                model=MODEL, stream=True, messages=[{"role": "user", "content": "fail [mock:error=503]"}]
            ):
                pass
        except openai.APIStatusError as e:
            expect(e.status_code == 502, f"status={e.status_code}")
            return f"502 {type(e).__name__}"
        except openai.APIError as e:
            raise CheckFailed(f"{type(e).__name__}: {e} body={getattr(e, 'body', None)!r}")
        raise CheckFailed("no exception")

    @check("openai error: [mock:error=429] -> RateLimitError")
    def err_429():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "slow [mock:error=429]"}])
        except openai.RateLimitError as e:
            ra = e.response.headers.get("retry-after")
            expect(ra is not None, f"retry-after header missing; headers={dict(e.response.headers)}")
            return f"429 retry-after={ra} message={e.message!r}"
        raise CheckFailed("no exception")

    @check("openai error: [mock:error=429] with_options(max_retries=2) -> retries, RateLimitError")
    def err_429_retry():
        t0 = time.monotonic()
        try:
            client.with_options(max_retries=2).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "retry [mock:error=429]"}]
            )
        except openai.RateLimitError:
            dt = time.monotonic() - t0
            expect(dt >= 1.5, f"ended after {dt:.2f}s: the SDK did not appear to wait retry-after between retries")
            return f"RateLimitError after {dt:.2f}s (2 retries honoring retry-after)"
        raise CheckFailed("no exception")

    for fn in (chat_plain, chat_raw, chat_stream_usage, chat_stream_plain, chat_stream_raw, emb_default,
               emb_float, models_list, models_retrieve, err_unknown, err_unknown_retrieve, err_503,
               err_503_stream, err_429, err_429_retry):
        fn()


# ------------------------------------------------------------------------------------ Anthropic


def anthropic_checks(base: str) -> None:
    client = anthropic.Anthropic(base_url=base.rstrip("/"), api_key="sdk-check", max_retries=0, timeout=30)

    @check("anthropic.messages.create")
    def msg_create():
        text = "hello from claude sdk"
        m = client.messages.create(model=MODEL, max_tokens=64, system="be brief",
                                   messages=[{"role": "user", "content": text}])
        expect(m.type == "message" and m.role == "assistant", f"type={m.type} role={m.role}")
        expect(m.content and m.content[0].type == "text", f"content={m.content}")
        expect(m.content[0].text == text, f"text={m.content[0].text!r}")
        expect(m.stop_reason == "end_turn", f"stop_reason={m.stop_reason!r}")
        expect(m.usage and m.usage.input_tokens > 0 and m.usage.output_tokens == 4, f"usage={m.usage}")
        expect(m.id, f"id={m.id!r}")
        return f"id={m.id} stop_reason={m.stop_reason} usage=in {m.usage.input_tokens}/out {m.usage.output_tokens}"

    @check("anthropic.messages.create with_raw_response header")
    def msg_raw():
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=64,
                                                       messages=[{"role": "user", "content": "hdr"}])
        rid = raw.headers.get("x-sluice-request-id")
        expect(bool(rid), f"x-sluice-request-id missing; headers={dict(raw.headers)}")
        return f"x-sluice-request-id={rid}"

    @check("anthropic.messages.create (content blocks, multi-turn)")
    def msg_blocks():
        m = client.messages.create(model=MODEL, max_tokens=64, messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second turn"}]},
        ])
        expect(m.content[0].text == "second turn", f"text={m.content[0].text!r}")
        return "echoed last user turn"

    @check("anthropic.messages.stream")
    def msg_stream():
        text = "streamed via anthropic sdk"
        with client.messages.stream(model=MODEL, max_tokens=64, system="be brief",
                                    messages=[{"role": "user", "content": text}]) as s:
            got = "".join(s.text_stream)
            final = s.get_final_message()
        expect(got == text, f"text_stream={got!r}")
        expect(final.content and final.content[0].text == text, f"final content={final.content}")
        expect(final.stop_reason == "end_turn", f"stop_reason={final.stop_reason!r}")
        expect(final.usage.output_tokens == 4, f"usage={final.usage}")
        expect(final.usage.input_tokens > 0, f"usage={final.usage}")
        return f"stop_reason={final.stop_reason} usage=in {final.usage.input_tokens}/out {final.usage.output_tokens}"

    @check("anthropic.messages.create stream=True events")
    def msg_stream_events():
        events = [e.type for e in client.messages.create(
            model=MODEL, max_tokens=64, stream=True, messages=[{"role": "user", "content": "a b"}])]
        expect(events and events[0] == "message_start" and events[-1] == "message_stop", f"events={events}")
        for t in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta"):
            expect(t in events, f"{t} missing: {events}")
        return " ".join(dict.fromkeys(events))

    @check("anthropic error: unknown model -> NotFoundError")
    def msg_unknown():
        try:
            client.messages.create(model="no-such-model", max_tokens=16,
                                   messages=[{"role": "user", "content": "x"}])
        except anthropic.NotFoundError as e:
            body = e.body if isinstance(e.body, dict) else {}
            expect(body.get("type") == "error" and isinstance(body.get("error"), dict),
                   f"error body not Anthropic-shaped: {e.body!r}")
            return f"404 error.type={body['error'].get('type')} message={body['error'].get('message')!r}"
        raise CheckFailed("no exception")

    @check("anthropic error: [mock:error=503] -> APIStatusError 502")
    def msg_503():
        try:
            client.messages.create(model=MODEL, max_tokens=16,
                                   messages=[{"role": "user", "content": "x [mock:error=503]"}])
        except anthropic.APIStatusError as e:
            expect(e.status_code == 502, f"status={e.status_code} body={e.body!r}")
            return f"502 {type(e).__name__} body={e.body!r}"
        raise CheckFailed("no exception")

    @check("anthropic error: [mock:error=429] -> RateLimitError")
    def msg_429():
        try:
            client.messages.create(model=MODEL, max_tokens=16,
                                   messages=[{"role": "user", "content": "x [mock:error=429]"}])
        except anthropic.RateLimitError as e:
            return f"429 body={e.body!r}"
        raise CheckFailed("no exception")

    for fn in (msg_create, msg_raw, msg_blocks, msg_stream, msg_stream_events, msg_unknown, msg_503, msg_429):
        fn()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url", nargs="?", default="http://127.0.0.1:4141", help="gateway root (no /v1)")
    args = ap.parse_args()
    print(f"openai {openai.__version__}, anthropic {anthropic.__version__}, gateway {args.base_url}")
    openai_checks(args.base_url)
    anthropic_checks(args.base_url)
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
