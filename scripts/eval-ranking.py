#!/usr/bin/env python3
"""Reproduce the tables of docs/retrieval.md with the product itself.

usage: scripts/eval-ranking.py [--work DIR] [--bruno PATH] [--only "NAME|NAME"] [--with-summary]

Builds the labelled set (scripts/build-eval-set.py), indexes its corpus
into one store per chunking setting with `bruno dev` (embedded broker, no
RabbitMQ needed) and `bruno ingest --wait`, then for every ranking variant
restarts `bruno dev` on that store with the variant's `retriever.ranking`
settings and runs `bruno eval --json`. Prints one markdown table row per
variant (document level, then chunk-level MRR@10) and writes every report
to WORK/reports/NAME.json.
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
INGRESS = "127.0.0.1:18180"
ADMIN = "127.0.0.1:18190"

# name, chunk context, search mode, retriever.ranking settings
OLD = {"rrf_k": 60, "vector_weight": 1, "text_weight": 1, "document_share": 0, "mmr_lambda": 0.7}
NAIVE = {"rrf_k": 60, "vector_weight": 1, "text_weight": 1, "document_share": 0, "mmr_lambda": 1}
BEST = {**OLD, "mmr_lambda": 1}
VARIANTS = [
    ("after: vector only", True, "vector", {}),
    ("after: text only", True, "text", {}),
    ("after: hybrid, the defaults", True, "hybrid", {}),
    ("before: vector only", False, "vector", OLD),
    ("before: text only", False, "text", OLD),
    ("before: hybrid (RRF k=60, MMR 0.7)", False, "hybrid", OLD),
    ("naive RRF k=60, no MMR", False, "hybrid", NAIVE),
    ("+ context: vector only", True, "vector", OLD),
    ("+ context: text only", True, "text", OLD),
    ("+ context: hybrid", True, "hybrid", OLD),
    ("+ context: naive RRF k=60, no MMR", True, "hybrid", NAIVE),
    ("+ context, no MMR (λ=1)", True, "hybrid", {**OLD, "mmr_lambda": 1}),
    ("+ context, MMR λ=0.85", True, "hybrid", {**OLD, "mmr_lambda": 0.85}),
    ("+ context, MMR λ=0.5", True, "hybrid", {**OLD, "mmr_lambda": 0.5}),
    ("+ context, RRF k=10", True, "hybrid", {**OLD, "rrf_k": 10}),
    ("+ context, RRF k=30", True, "hybrid", {**OLD, "rrf_k": 30}),
    ("+ context, RRF k=120", True, "hybrid", {**OLD, "rrf_k": 120}),
    ("+ context, text weight 0.5", True, "hybrid", {**OLD, "text_weight": 0.5}),
    ("+ context, text weight 2", True, "hybrid", {**OLD, "text_weight": 2}),
    ("+ context, document share 0.25", True, "hybrid", {**OLD, "document_share": 0.25}),
    ("+ context, document share 0.5", True, "hybrid", {**OLD, "document_share": 0.5}),
    ("+ context, document share 1", True, "hybrid", {**OLD, "document_share": 1}),
    ("+ context, no MMR, text weight 0.5", True, "hybrid", {**BEST, "text_weight": 0.5}),
    ("+ context, no MMR, 8 candidates per hit", True, "hybrid", {**BEST, "candidates_per_hit": 8}),
    ("+ context, no MMR, score fusion", True, "hybrid", {**BEST, "fusion": "scores"}),
    ("+ context, no MMR, score fusion, text 0.5", True, "hybrid",
     {**BEST, "fusion": "scores", "text_weight": 0.5}),
    ("+ context, no MMR, score fusion, text 0.3", True, "hybrid",
     {**BEST, "fusion": "scores", "text_weight": 0.3}),
    ("+ context, no MMR, score fusion, text 0.7", True, "hybrid",
     {**BEST, "fusion": "scores", "text_weight": 0.7}),
    ("+ context, no MMR, min-max fusion, text 0.3", True, "hybrid",
     {**BEST, "fusion": "minmax", "text_weight": 0.3}),
    ("+ context, no MMR, min-max fusion, text 0.5", True, "hybrid",
     {**BEST, "fusion": "minmax", "text_weight": 0.5}),
    ("+ context, no MMR, min-max fusion, text 1", True, "hybrid",
     {**BEST, "fusion": "minmax", "text_weight": 1}),
    ("+ context, no MMR, score fusion, text 0.2", True, "hybrid",
     {**BEST, "fusion": "scores", "text_weight": 0.2}),
]


def env_for(work, store, context, ranking):
    env = dict(os.environ)
    env.pop("BRUNO_BROKER__URL", None)
    env.update({
        "BRUNO_BROKER__EMBEDDED_DIR": str(work / f"broker-{store}"),
        "BRUNO_STORE__URI": str(work / f"lancedb-{store}"),
        "BRUNO_STORE__READ_CONSISTENCY_MS": "100",
        "BRUNO_INGRESS__LISTEN": INGRESS,
        "BRUNO_ADMIN__LISTEN": ADMIN,
        "BRUNO_WRITER__BATCH_MS": "100",
        "BRUNO_CHUNKING__CONTEXT": "true" if context else "false",
    })
    for key, value in ranking.items():
        env[f"BRUNO_RETRIEVER__RANKING__{key.upper()}"] = str(value)
    return env


def start(bruno, env, log):
    proc = subprocess.Popen([bruno, "dev", "--parts", "ingress,embedder,writer,retriever"],
                            env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bruno dev exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://{ADMIN}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.3)
    stop(proc)
    sys.exit("bruno dev was not ready in 120 s")


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("target/eval-ranking"))
    ap.add_argument("--bruno", default=os.environ.get("BRUNO", "bruno"))
    ap.add_argument("--only", help="variant names to run, separated by |")
    ap.add_argument("--docs", default="800")
    ap.add_argument("--queries", default="300")
    ap.add_argument("--with-summary", action="store_true",
                    help="the easier set: each page keeps the sentence it is asked by")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "reports").mkdir(exist_ok=True)
    log = open(work / "bruno-dev.log", "a")
    subprocess.run([sys.executable, HERE / "build-eval-set.py", work / "set",
                    "--docs", args.docs, "--queries", args.queries]
                   + (["--with-summary"] if args.with_summary else []), check=True)
    queries = work / "set" / "queries.jsonl"

    only = set(args.only.split("|")) if args.only else None
    chosen = [v for v in VARIANTS if not only or v[0] in only]
    for context in sorted({v[1] for v in chosen}):
        store = "context" if context else "plain"
        if (work / f"indexed-{store}").exists():
            continue
        env = env_for(work, store, context, {})
        proc = start(args.bruno, env, log)
        began = time.time()
        run([args.bruno, "ingest", work / "set" / "corpus", "--url", f"http://{INGRESS}/",
             "--source", "std", "--wait", "--json"], env)
        print(f"indexed the corpus ({store}) in {time.time() - began:.0f} s", file=sys.stderr)
        stop(proc)
        (work / f"indexed-{store}").touch()

    print("| variant | MRR@10 | nDCG@10 | R@1 | R@5 | R@10 | chunk MRR@10 | p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, context, mode, ranking in chosen:
        store = "context" if context else "plain"
        env = env_for(work, store, context, ranking)
        proc = start(args.bruno, env, log)
        try:
            report = json.loads(run([args.bruno, "eval", queries, "--mode", mode, "--json"], env))
        finally:
            stop(proc)
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        (work / "reports" / f"{slug}.json").write_text(json.dumps(report, indent=1))
        d, c = report["document"], report["chunk"]
        print(f"| {name} | {d['mrr_at_10']:.4f} | {d['ndcg_at_10']:.4f} | {d['recall_at_1']:.3f} | "
              f"{d['recall_at_5']:.3f} | {d['recall_at_10']:.3f} | {c['mrr_at_10']:.4f} | "
              f"{report['latency']['p50_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
