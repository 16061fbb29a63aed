"""Drive Bruno's gateway with the official `openai` client, unchanged.

usage: python3 openai_chat.py BASE_URL   (e.g. http://127.0.0.1:8081/v1)
Prints JSON: the model list, a plain completion and a streamed one.
"""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused")
models = [m.id for m in client.models.list()]
plain = client.chat.completions.create(
    model="bruno",
    messages=[{"role": "user", "content": "hello from python"}],
)
pieces = []
stream = client.chat.completions.create(
    model="bruno",
    messages=[{"role": "user", "content": "stream from python"}],
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
print(json.dumps({
    "models": models,
    "plain": plain.choices[0].message.content,
    "plain_usage": plain.usage.total_tokens,
    "streamed": "".join(pieces),
}))
