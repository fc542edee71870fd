"""Every recipe in params/ builds its dataset (stage 01) from the shared real-data samples, offline."""
import json

import pytest

from conftest import ROOT
from tunebook import data, runs

RECIPES = ["squad_rag", "jaqket_rag", "hotpotqa_raft", "livedoor_genre", "debian_faq"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_its_dataset(recipe, shared_datasets, tmp_path):
    run = runs.open_run(ROOT / "params" / f"{recipe}.yaml", [f"output_dir={tmp_path}"])
    built = data.build_dataset(run)
    train_ids, eval_ids = {e["id"] for e in built.train}, {e["id"] for e in built.eval}
    assert len(built.eval) >= 20 and len(built.train) > len(built.eval) / 2 and not train_ids & eval_ids
    stats = {row["split"]: row for row in built.summary["table"]}
    if recipe == "livedoor_genre":
        assert len(built.summary["labels"]) == 9
        assert all(e["completion"][0]["content"] in built.summary["labels"] for e in built.train)
        assert "Genres: dokujo-tsushin, it-life-hack" in built.eval[0]["prompt"][-1]["content"]
    elif recipe == "debian_faq":
        # passages are retrieved from the FAQ itself; the hit rate is counted, and it is neither 0 nor 1
        assert 0 < stats["eval"]["gold_doc_retrieved"] < stats["eval"]["examples"]
        assert all(len(e["passages"]) == 2 for e in built.eval)
    else:
        assert stats["eval"]["gold_in_passages"] >= 0.8 * stats["eval"]["examples"]
    saved = [json.loads(line) for line in (run.dir / "dataset" / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["id"] for e in saved] == [e["id"] for e in built.eval]
