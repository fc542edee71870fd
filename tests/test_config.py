import re

import pytest

from conftest import ROOT
from tunebook.config import ParamsError, load_params, schema_markdown, schema_rows

MINIMAL = "data:\n  train_path: rows.jsonl\n"


def test_shipped_params_files_validate():
    for path in sorted((ROOT / "params").glob("*.yaml")):
        params = load_params(path)
        assert params.run_name


def test_defaults_fill_every_section(write_params):
    params = load_params(write_params(MINIMAL))
    assert params.model.name == "embedded:SmolLM2-135M-Instruct"
    assert params.train.target_modules == "all-linear"
    assert params.evaluate.models == ["base", "finetuned", "quantized"]


def test_relative_paths_resolve_against_the_params_file(write_params, tmp_path):
    params = load_params(write_params(MINIMAL + "output_dir: out\n"))
    assert params.data.train_path == str(tmp_path / "rows.jsonl")
    assert params.run_dir == tmp_path / "out" / "default"


def test_hub_ids_are_left_alone(write_params):
    params = load_params(write_params("data:\n  train_path: org/some-dataset\nmodel:\n  name: Qwen/Qwen2.5-0.5B-Instruct\n"))
    assert params.data.train_path == "org/some-dataset"
    assert params.model.name == "Qwen/Qwen2.5-0.5B-Instruct"


def test_misspelled_key_suggests_the_closest(write_params):
    with pytest.raises(ParamsError) as e:
        load_params(write_params(MINIMAL + "train:\n  learning_rat: 0.1\n"))
    message = str(e.value)
    assert "unknown key 'train.learning_rat'" in message
    assert "Did you mean 'train.learning_rate'?" in message


def test_misspelled_top_level_section(write_params):
    with pytest.raises(ParamsError, match="Did you mean 'evaluate'"):
        load_params(write_params(MINIMAL + "evalute:\n  batch_size: 2\n"))


def test_wrong_type_names_key_and_value(write_params):
    with pytest.raises(ParamsError) as e:
        load_params(write_params(MINIMAL + "train:\n  batch_size: lots\n"))
    assert "'train.batch_size'" in str(e.value) and "'lots'" in str(e.value)


def test_training_rows_need_exactly_one_source(write_params):
    with pytest.raises(ParamsError, match="set exactly one of data.train_path .* and synthesize.documents_path"):
        load_params(write_params("run_name: x\n"))
    with pytest.raises(ParamsError, match="set exactly one"):
        load_params(write_params(MINIMAL + "synthesize:\n  documents_path: docs\n"))
    with pytest.raises(ParamsError, match="chunks are the retrieval corpus"):
        load_params(write_params("synthesize:\n  documents_path: docs\ndata:\n  retrieval: {corpus_path: c.jsonl}\n"))
    with pytest.raises(ParamsError, match=r"synthesize: chunk_overlap \(200\) must be under half of chunk_tokens \(384\)"):
        load_params(write_params("synthesize:\n  documents_path: docs\n  chunk_overlap: 200\n"))
    params = load_params(write_params("synthesize:\n  documents_path: docs\n"))
    assert params.data.train_path is None and params.synthesize.documents_path.endswith("docs")


def test_overrides_are_typed_and_checked(write_params):
    path = write_params(MINIMAL)
    params = load_params(path, ["train.max_steps=10", "train.target_modules=[q_proj, v_proj]"])
    assert params.train.max_steps == 10
    assert params.train.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ParamsError, match="Did you mean 'train.max_steps'"):
        load_params(path, ["train.max_step=10"])
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        load_params(path, ["train.max_steps"])


def test_missing_file_and_bad_yaml(tmp_path, write_params):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write_params("data: [unclosed\n"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ParamsError, match="not UTF-8"):
        load_params(bad)


def test_bad_run_name_and_unknown_eval_model(write_params):
    with pytest.raises(ParamsError, match="run_name"):
        load_params(write_params(MINIMAL + "run_name: ../escape\n"))
    with pytest.raises(ParamsError, match="unknown model label"):
        load_params(write_params(MINIMAL + "evaluate:\n  models: [base, gpt4]\n"))


def test_every_knob_has_a_meaning():
    rows = schema_rows()
    assert len(rows) > 30
    assert all(meaning for _, _, meaning in rows)


def test_readme_params_table_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- params-table:start -->\n(.*?)\n<!-- params-table:end -->", readme, re.S)
    assert table, "README.md lacks the generated params table markers"
    assert table.group(1).strip() == schema_markdown().strip(), "README params table is stale: run `python -m tunebook params --update-readme README.md`"


def test_raft_and_retrieval_do_not_combine(write_params):
    path = write_params("data:\n  train_path: x.jsonl\n  raft: {enabled: true}\n  retrieval: {corpus_path: docs.jsonl}\n")
    with pytest.raises(ParamsError, match="cannot be combined with data.retrieval.corpus_path"):
        load_params(path)
