#!/usr/bin/env python3
"""Drives a running kvroute gateway with the official `openai` Python package: models, a chat
request with an image sent twice (the second must be routed to the same worker, fully cached),
the same as a stream with usage, a bad image (400), and a legacy completion.

Usage: scripts/openai-client-check.py http://127.0.0.1:8000 tests/fixtures/images/chelsea.png
(needs `pip install openai`)."""
import base64, sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
model = "Qwen/Qwen2-VL-2B-Instruct"
image = base64.b64encode(open(sys.argv[2], "rb").read()).decode()
messages = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    {"type": "text", "text": "What is in this image?"}]}]

print("models:", [m.id for m in client.models.list()])
for attempt in (1, 2):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8)
    reply = raw.parse()
    print(f"chat #{attempt}: worker={raw.headers['x-kvroute-worker']} overlap_blocks={raw.headers['x-kvroute-overlap-blocks']}"
          f" predicted={raw.headers['x-kvroute-predicted-cached-tokens']} cached_tokens={reply.usage.prompt_tokens_details.cached_tokens}"
          f" prompt_tokens={reply.usage.prompt_tokens} text={reply.choices[0].message.content!r}")
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                        stream_options={"include_usage": True})
chunks, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        chunks.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
print(f"stream: {len(chunks)} content chunks, text={''.join(chunks)!r}, cached_tokens={usage.prompt_tokens_details.cached_tokens}")
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
except Exception as error:
    print("bad image:", type(error).__name__, error)
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4)
print("completion:", repr(c.choices[0].text), c.usage.prompt_tokens)
