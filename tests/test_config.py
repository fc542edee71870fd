import re

import pytest

from conftest import ROOT
from tunebook.cli import PARAMS_DOC
from tunebook.params.load import load_params, read_yaml
from tunebook.params.reference import schema_markdown, schema_rows
from tunebook.params.schema import ParamsError

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


def test_the_params_page_table_is_generated_from_the_schema():
    page = (ROOT / PARAMS_DOC).read_text(encoding="utf-8")
    table = re.search(r"<!-- params-table:start -->\n(.*?)\n<!-- params-table:end -->", page, re.S)
    assert table, f"{PARAMS_DOC} lacks the generated params table markers"
    assert table.group(1).strip() == schema_markdown().strip(), f"{PARAMS_DOC}'s params table is stale: run `python -m tunebook params --update-docs`"
    assert all(row.count("|") == 5 for row in table.group(1).splitlines()), "a row of the table spans lines or holds a stray |"


def test_raft_and_retrieval_do_not_combine(write_params):
    path = write_params("data:\n  train_path: x.jsonl\n  raft: {enabled: true}\n  retrieval: {corpus_path: docs.jsonl}\n")
    with pytest.raises(ParamsError, match="cannot be combined with data.retrieval.corpus_path"):
        load_params(path)


def test_raft_reasoning_needs_the_final_answer_prefix(write_params):
    """Without it 04 would score the quotes and the reasoning as the answer: every answer wrong, for no visible reason."""
    path = write_params("data:\n  train_path: x.jsonl\n  raft: {enabled: true}\n")
    with pytest.raises(ParamsError, match=r"data.raft.cot trains the model to write its reasoning.*set prompt.final_answer_prefix"):
        load_params(path)
    assert load_params(path, ["prompt.final_answer_prefix=Answer:"]).prompt.final_answer_prefix == "Answer:"
    assert load_params(path, ["data.raft.cot=false"]).data.raft.cot is False


def test_a_key_given_twice_is_refused_with_both_lines(write_params):
    path = write_params(MINIMAL + "train:\n  lora_r: 8\n  lora_alpha: 16\n  lora_r: 32\n")
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert str(e.value) == f"{path}: key 'train.lora_r' is given twice, on lines 4 and 6; keep one (YAML would silently use the last)."
    with pytest.raises(ParamsError, match=r"key 'data' is given twice, on lines 1 and 4"):
        load_params(write_params(MINIMAL + "seed: 1\ndata:\n  eval_size: 3\n"))
    with pytest.raises(ParamsError, match=r"key 'evaluate.api_baselines.1.model' is given twice, on line 6;"):
        load_params(write_params(MINIMAL + "evaluate:\n  api_baselines:\n    - {label: a, model: m}\n    - {label: b, model: m, model: n}\n"))
    # The same key in two mappings is no repeat, and a merge key's values may be overridden (that is what it is for).
    params = load_params(write_params(MINIMAL + "train: {batch_size: 2}\nevaluate: {batch_size: 4}\n"))
    assert (params.train.batch_size, params.evaluate.batch_size) == (2, 4)
    assert read_yaml(write_params("a: &b {x: 1, y: 1}\nc:\n  <<: *b\n  x: 2\n", "m.yaml"))["c"] == {"x": 2, "y": 1}


def test_legal_types_with_no_legal_meaning_name_the_key_the_value_and_the_rule(write_params):
    path = write_params(MINIMAL)
    cases = {
        "data.eval_size=1.5": "data.eval_size must be a fraction between 0 and 1 (e.g. 0.2) or a whole number of rows (e.g. 50); got 1.5.",
        "train.max_steps=0": "train.max_steps must be -1 (run the full train.epochs) or a number of steps of at least 1; got 0.",
        "train.target_modules=5": "train.target_modules must be 'all-linear' or a list of layer names such as [q_proj, v_proj]; got 5.",
        "train.target_modules=[]": "train.target_modules must be 'all-linear' or a list of layer names such as [q_proj, v_proj]; got [].",
        "train.lora_r=true": "train.lora_r must be a number, not true or false; got true.",
        "seed=-1": "seed must be a whole number from 0 to 4294967295; got -1.",
        "evaluate.stop_strings=['']": "evaluate.stop_strings must be a list of non-empty strings, e.g. [\"\\n\"] (an empty one would cut every answer to nothing); got [''].",
        "quantize.methods=[gguf_q8_0, gguf_q8_0]": "quantize.methods must list each method once (gguf_q8_0 more than once); got ['gguf_q8_0', 'gguf_q8_0'].",
    }
    for override, line in cases.items():
        with pytest.raises(ParamsError) as e:
            load_params(path, [override])
        assert str(e.value).splitlines()[1] == f"  - {line}", override
    for override, fragment in {
        "data.group_field=id": "data.group_field is data.id_field ('id'): every row would be a group of its own",
        "evaluate.models=[base, base]": "evaluate.models must list each model once (base more than once)",
        "prompt.template='{passages}'": "prompt.template must have a {question} placeholder",
        "synthesize.clean.min_question_chars=400": "min_question_chars (400) is above max_question_chars (300)",
        "output_dir=''": "output_dir must be a folder",
        "evaluate.api_baselines=[{label: x, model: m, base_url: 'localhost:8080'}]": "evaluate.api_baselines.0.base_url must be an http:// or https:// address",
        "sweep.stages=[]": "sweep.stages must name at least one stage, e.g. 04,05 (stages: 01 (build_dataset),",
    }.items():
        with pytest.raises(ParamsError, match=re.escape(fragment)):
            load_params(path, [override])
    assert load_params(path, ["data.eval_size=8"]).data.eval_size == 8
    assert load_params(path, ["data.eval_size=0.25", "train.max_steps=-1", "evaluate.models=[base]"]).data.eval_size == 0.25


def test_every_union_key_says_what_it_takes_in_the_users_terms():
    """pydantic names a union's branches (str, list[str]) in its errors: such a key must carry its own rule."""
    import types
    import typing

    from tunebook.params.schema import Params, section_type

    def has_union(annotation) -> bool:  # X | None is not one: pydantic reports it as X
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len([a for a in args if a is not type(None)]) > 1:
            return True
        return typing.get_origin(annotation) is not typing.Literal and any(has_union(a) for a in args)

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            section = section_type(field.annotation)
            if section is not None:
                yield from walk(section, f"{prefix}{name}.")
            elif has_union(field.annotation):
                yield prefix + name, (field.json_schema_extra or {}).get("allowed")

    unions = dict(walk(Params))
    assert {"train.target_modules", "sweep.grid"} <= set(unions)
    assert all(unions.values()), [k for k, v in unions.items() if not v]
