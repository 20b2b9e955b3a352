#!/usr/bin/env python3
"""The official openai package against a running kvroute (`kvroute demo`), by hand, not in CI:

    python3 -m venv /tmp/venv-openai && /tmp/venv-openai/bin/pip install openai
    /tmp/venv-openai/bin/python scripts/openai-check.py http://127.0.0.1:8000/v1 tests/fixtures/images/chelsea.png

Sends an image request twice (the second must come back with cached_tokens equal to the
predicted ones), streams it, lists the models, and sends a bad image (a typed 400 error).
"""
import base64, sys
from openai import OpenAI

base_url, image = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="unused")
model = "Qwen/Qwen2-VL-2B-Instruct"
data_url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
messages = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": data_url}},
    {"type": "text", "text": "What is in this image?"}]}]

for attempt in (1, 2):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8)
    reply = raw.parse()
    print(f"non-streamed #{attempt}: worker={raw.headers['x-kvroute-worker']} "
          f"overlap_blocks={raw.headers['x-kvroute-overlap-blocks']} "
          f"predicted_cached={raw.headers['x-kvroute-predicted-cached-tokens']} "
          f"prompt_tokens={reply.usage.prompt_tokens} "
          f"cached_tokens={reply.usage.prompt_tokens_details.cached_tokens} "
          f"finish={reply.choices[0].finish_reason} text={reply.choices[0].message.content!r}")

stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                        stream_options={"include_usage": True})
text, chunks, usage = "", 0, None
for chunk in stream:
    chunks += 1
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
print(f"streamed: {chunks} chunks, text={text!r}, prompt_tokens={usage.prompt_tokens}, "
      f"cached_tokens={usage.prompt_tokens_details.cached_tokens}")
models = client.models.list()
print("models:", [m.id for m in models.data])
try:
    client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])
    print("bad image: accepted?!")
except Exception as error:  # the client's typed error for an HTTP 4xx with an OpenAI error body
    print(f"bad image: {type(error).__name__} status={error.status_code} code={error.code!r}")
