"""The stage map: which stage first reads each params key, declared in the schema (params/schema.py's read_first_by) and derived
from it by the stage keys, sweeps' shared stages, the untrained rows' key and compare's where-keys."""

import ast

import pytest
from pydantic import Field

from conftest import ROOT
from tunebook.params.reference import schema_rows
from tunebook.params.schema import STAGES, Params, TrainParams, stage_map
from tunebook.run.keys import FIRST_READ_BY, WHERE_KEYS, first_read_by

# The stage each module's code runs in, by its folder: a read there of a key the schema gives a later stage is a key
# that stage's outputs depend on without its key saying so (a sweep would then copy the stage instead of re-running it).
STAGE_FOLDERS = {
    "dataset": "01_build_dataset",
    "training": "02_finetune",
    "quantizing": "03_quantize",
    "evaluation": "04_evaluate",
    "analysis": "05_error_analysis",
}
STAGE_MODULES = {
    f"{p.parent.name}/{p.stem}": STAGE_FOLDERS[p.parent.name]
    for f in STAGE_FOLDERS
    for p in sorted((ROOT / "lib" / "tunebook" / f).glob("*.py"))
    if p.stem != "__init__"
}


def test_every_key_has_a_stage_or_is_where_a_run_lives():
    for key, _, _ in schema_rows():
        stage = first_read_by(key.split("[]")[0].rstrip("."))
        assert stage in STAGES or (stage is None and (key.split(".")[0] in WHERE_KEYS or key in WHERE_KEYS)), key
    assert set(WHERE_KEYS) >= {"run_name", "output_dir", "sweep", "colab", "train.answers_before_after"}
    assert first_read_by("model.name") == "01_build_dataset" and first_read_by("model.backend") == "02_finetune"
    assert first_read_by("evaluate.metric") == "01_build_dataset" and first_read_by("evaluate.batch_size") == "04_evaluate"


def test_a_section_added_without_its_stage_is_refused():
    class WithANewSection(Params):
        distill: TrainParams = Field(default_factory=TrainParams, description="a section nobody marked")

    with pytest.raises(TypeError, match=r"Params.distill has no read_first_by\(...\) mark"):
        stage_map(WithANewSection)
    assert stage_map() == FIRST_READ_BY


def params_reads(module: str) -> set[str]:
    """Dotted keys a module reads as p.X.Y, params.X.Y or run.params.X.Y."""
    reads, tree = set(), ast.parse((ROOT / "lib" / "tunebook" / f"{module}.py").read_text())
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # p.evaluate within p.evaluate.metric
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            chain = [node.id, *reversed(parts)]
            start = 1 if chain[0] in ("p", "params") else 2 if chain[:2] == ["run", "params"] else None
            if start and len(chain) > start and chain[start] in Params.model_fields:
                reads.add(".".join(chain[start:]))
    return reads


@pytest.mark.parametrize("module", list(STAGE_MODULES))
def test_no_stage_reads_a_key_declared_for_a_later_stage(module):
    stage, later = STAGE_MODULES[module], []
    for key in sorted(params_reads(module)):
        try:
            first = first_read_by(key)
        except KeyError:  # a method of a section (model_copy, ...), not a key
            continue
        if first is not None and STAGES.index(first) > STAGES.index(stage):
            later.append(f"{key} (declared {first})")
    assert not later, f"{module}.py runs in {stage} but reads {later}: mark the key read_first_by('{stage}') in params/schema.py"
    assert any(params_reads(m) for m in STAGE_MODULES if STAGE_MODULES[m] == stage), f"the check found no reads at all in {stage}'s folder"
