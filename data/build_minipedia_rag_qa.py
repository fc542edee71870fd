"""Build data/minipedia_rag_qa.jsonl, the default RAG-QA dataset, from the articles in data/minipedia/.

Each question gets its own article (the oracle passage) plus the DISTRACTORS articles that BM25 ranks
highest for the question among the other articles, in a seeded random order — what a retriever would
hand the model. Deterministic: running it again reproduces the committed file byte for byte.

    python data/build_minipedia_rag_qa.py
"""

import json
import random
from pathlib import Path

import bm25s

HERE = Path(__file__).parent
DISTRACTORS = 2
SEED = 20241121


def main() -> None:
    articles = [json.loads(line) for part in sorted((HERE / "minipedia").glob("part_*.jsonl")) for line in part.open(encoding="utf-8")]
    passages = [f"{a['title']}: {a['text']}" for a in articles]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    rng = random.Random(SEED)
    rows = []
    for index, article in enumerate(articles):
        for number, qa in enumerate(article["questions"], start=1):
            ranked, _ = retriever.retrieve(bm25s.tokenize([qa["q"]], stopwords="en", show_progress=False), k=DISTRACTORS + 1, show_progress=False)
            distractors = [int(i) for i in ranked[0] if int(i) != index][:DISTRACTORS]
            chosen = [index, *distractors]
            rng.shuffle(chosen)
            for answer in qa["a"]:
                assert answer in article["text"], (article["id"], answer)
            rows.append(
                {
                    "id": f"{article['id']}-q{number}",
                    "article": article["id"],
                    "question": qa["q"],
                    "passages": [passages[i] for i in chosen],
                    "answers": qa["a"],
                }
            )
    out = HERE / "minipedia_rag_qa.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} questions over {len(articles)} articles to {out}")


if __name__ == "__main__":
    main()
