"""Send a Bruno event with the official CloudEvents Python SDK (PyPI `cloudevents`).

usage: send_events.py http-binary|http-structured URL
       send_events.py rabbitmq-binary|rabbitmq-structured

Prints one JSON line: what was sent (and, for HTTP, the ingress's status).
"""

import json
import sys
import urllib.error
import urllib.request

from cloudevents.core.bindings import http, rabbitmq
from cloudevents.core.v1.event import CloudEvent

mode = sys.argv[1]
event = CloudEvent(
    attributes={
        "type": "bruno.document.submitted.v1",
        "source": "/python-sdk",
        "subject": "py doc \u2603 100%",
        "correlationid": "py-corr",
        "datacontenttype": "application/json",
    },
    data={"doc_id": "py-1", "source": "python", "text": "h\u00e9llo \u2603 from the official SDK"},
)
out = {
    "id": event.get_id(),
    "time": event.get_time().isoformat(),
}
if mode.startswith("http-"):
    message = http.to_binary_event(event) if mode == "http-binary" else http.to_structured_event(event)
    request = urllib.request.Request(sys.argv[2], data=message.body, headers=message.headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            out["status"] = response.status
            out["response"] = response.read().decode()
    except urllib.error.HTTPError as e:
        out["status"] = e.code
        out["response"] = e.read().decode()
else:
    binding = rabbitmq.to_binary_event if mode == "rabbitmq-binary" else rabbitmq.to_structured_event
    message = binding(event)
    out["headers"] = message.headers
    out["content_type"] = message.content_type
out["body_hex"] = message.body.hex()
print(json.dumps(out))
