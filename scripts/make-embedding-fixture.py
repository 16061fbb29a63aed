"""Compute reference all-MiniLM-L6-v2 vectors with sentence-transformers.

Run once (needs torch + sentence-transformers, not part of CI):
    python3 scripts/make-embedding-fixture.py MODEL_DIR > libs/bruno-embed/tests/fixtures/minilm_reference.json
"""

import json
import sys

from sentence_transformers import SentenceTransformer

LONG = " ".join(f"word{i} of a long operator runbook about restoring backups" for i in range(80))
SENTENCES = [
    "How do I restore a LanceDB backup?",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln: die Dienste laufen wieder, ☃ und 東京 auch.",
    "RabbitMQ quorum queues replicate messages across three nodes.",
    "a",
    "",
    "Reset the router, then check whether the DHCP lease renewed correctly on VLAN 20.",
    LONG,
]

model = SentenceTransformer(sys.argv[1], device="cpu")
assert model.max_seq_length == 256, model.max_seq_length
vectors = model.encode(SENTENCES, normalize_embeddings=True, batch_size=8)
print(json.dumps({
    "model": "sentence-transformers/all-MiniLM-L6-v2",
    "max_seq_length": model.max_seq_length,
    "sentences": SENTENCES,
    "vectors": [[round(float(x), 7) for x in v] for v in vectors],
}))
