"""The paper evaluation's tasks on the shared data: folder resolution from the data root or the task's
folder, the DAPT tasks' counts and main metrics, report splits, SQuAD's re-split and task text for TAPT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from unipelt.tasks import DOMAIN_TASKS, GlueTask, JsonlTask, TaskDataError, get_task
from unipelt.tasks.ner import NerTask
from unipelt.tasks.squad import SquadTask

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIPELT_DATA_DIR", ROOT.parent / "shared" / "data"))
COUNTS = json.loads((DATA / "COUNTS.json").read_text(encoding="utf-8"))
SPLITS = ("train", "dev", "test")
# the domain tasks that exist offline (DOMAIN_TASKS also names RCT, AG News and Helpfulness)
SHARED_DOMAINS = sorted({key.split("/")[1] for key in COUNTS if key.startswith("domains/")})


def test_shared_domains_are_domain_tasks():
    assert SHARED_DOMAINS == ["chemprot", "citation_intent", "hyperpartisan", "imdb", "sciie"]
    assert set(SHARED_DOMAINS) <= set(DOMAIN_TASKS)


@pytest.mark.parametrize("name", SHARED_DOMAINS)
def test_domain_task_loads_from_the_root_and_its_folder(name):
    for data_dir in (DATA, DATA / "domains" / name):
        task = get_task(name)
        assert isinstance(task, JsonlTask)
        for split in SPLITS:
            examples = task.load(split, str(data_dir))
            assert len(examples) == COUNTS[f"domains/{name}/{split}"], (data_dir, split)
            assert all(ex.text_a and ex.text_b is None and isinstance(ex.label, int) for ex in examples)
        assert task.default_report_split(str(data_dir)) == "test"
    assert task.data_folder(str(DATA / "domains")) == DATA / "domains" / name  # data_dir/<name> too


def test_domain_metrics():
    chemprot = get_task("chemprot")
    chemprot.load("train", str(DATA))
    assert chemprot.main_metric == "f1_micro"
    assert chemprot.metric_names == ("f1_micro", "f1_macro", "accuracy")
    assert len(chemprot.labels) == 13
    assert get_task("rct").main_metric == "f1_micro"
    imdb = get_task("imdb")
    assert (imdb.main_metric, imdb.metric_names) == ("f1_macro", ("f1_macro", "accuracy", "f1_micro"))
    text = get_task("text")
    assert (text.main_metric, text.report_split) == ("f1_macro", "dev")


def test_report_splits_and_lengths():
    root = str(DATA)
    assert get_task("rte").default_report_split(root) == "dev"
    assert get_task("rte").default_report_split(None) == "dev"
    squad = SquadTask()
    assert squad.default_report_split(root) == "test"
    assert squad.default_report_split(str(DATA / "squad")) == "test"
    assert squad.default_report_split(None) == "dev"  # the Hub: official dev
    assert (squad.max_length, get_task("cola").max_length, get_task("imdb").max_length) == (384, 128, 128)
    assert get_task("imdb,hyperpartisan").default_report_split(root) == "test"
    with pytest.raises(TaskDataError, match="--report-split"):
        get_task("rte,imdb").default_report_split(root)


def test_glue_loads_from_the_data_root():
    assert len(GlueTask("cola").load("dev", str(DATA))) == 1_043
    assert len(get_task("rte").load("dev", str(DATA))) == 277
    assert len(get_task("stsb").load("dev", str(DATA / "glue"))) == 1_500


@pytest.fixture(scope="module")
def squad_resplit():
    task = SquadTask()
    return task, task.load("train", str(DATA)), task.load("test", str(DATA))


def test_squad_resplit(squad_resplit):
    task, train, test = squad_resplit
    assert len(train) == COUNTS["squad/resplit-train questions"] == 8_106
    assert len(test) == COUNTS["squad/resplit-test questions"] == 2_464
    assert not {ex.id for ex in test} & {ex.id for ex in train}
    for data_dir in (DATA, DATA / "squad"):
        with pytest.raises(TaskDataError, match="test split"):
            task.load("dev", str(data_dir))


def test_squad_texts(squad_resplit):
    task, train, _ = squad_resplit
    texts = task.texts(train)
    contexts = list(dict.fromkeys(ex.context for ex in train))
    assert texts == contexts + [ex.question for ex in train]
    assert len(set(texts[:len(contexts)])) == len(contexts) < len(train)
    assert all(isinstance(t, str) and t for t in texts)


def test_sequence_and_ner_texts():
    articles = get_task("hyperpartisan").load("train", str(DATA))
    texts = get_task("hyperpartisan").texts(articles)
    assert len(texts) == len(articles) and all(texts)
    rte = get_task("rte").load("dev", str(DATA))
    texts = get_task("rte").texts(rte)
    assert len(texts) == 2 * len(rte) and texts[:2] == [rte[0].text_a, rte[0].text_b]
    ner = NerTask()
    sentences = ner.load("dev", str(DATA / "ner" / "ncbi-disease"))
    texts = ner.texts(sentences)
    assert len(texts) == len(sentences) == COUNTS["ner/ncbi-disease/dev sentences"]
    assert all(texts) and texts[0] == " ".join(sentences[0].tokens)
    with pytest.raises(NotImplementedError, match="digits"):
        get_task("digits").texts([])


def _jsonl(path: Path, *labels: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (path / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"t {lab}", "label": lab}) + "\n"
                                                     for lab in labels), encoding="utf-8")


def test_folder_resolution_order(tmp_path):
    with pytest.raises(TaskDataError) as err:
        JsonlTask("sciie").load("train", str(tmp_path))
    for tried in (tmp_path, tmp_path / "sciie", tmp_path / "domains" / "sciie"):
        assert str(tried / "train.jsonl") in str(err.value)
    _jsonl(tmp_path / "domains" / "sciie", "c")
    assert JsonlTask("sciie").data_folder(str(tmp_path)) == tmp_path / "domains" / "sciie"
    _jsonl(tmp_path / "sciie", "b")
    assert JsonlTask("sciie").data_folder(str(tmp_path)) == tmp_path / "sciie"
    _jsonl(tmp_path, "a")
    task = JsonlTask("sciie")
    assert [ex.text_a for ex in task.load("test", str(tmp_path))] == ["t a"]  # data_dir itself first
    assert task.labels == ("a",)
    # SQuAD: official train first; the re-split's dev is refused only while train is the re-split's
    doc = json.dumps({"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [
        {"id": "q", "question": "q?", "answers": [{"text": "c", "answer_start": 0}]}]}]}]})
    squad = tmp_path / "squad"
    squad.mkdir()
    for name in ("dev-v1.1.json", "resplit-train.json", "resplit-test.json"):
        (squad / name).write_text(doc, encoding="utf-8")
    with pytest.raises(TaskDataError, match="resplit-test.json"):
        SquadTask().load("dev", str(tmp_path))
    (squad / "train.json").write_text(doc, encoding="utf-8")
    assert len(SquadTask().load("dev", str(tmp_path))) == 1


@pytest.mark.parametrize("method, options", [("unipelt", {"prompt": True}), ("prefix", {})])
def test_the_seed_grid_squad_cell_trains_and_reports_on_the_resplit_test(method, options, tmp_path):
    """The rows that change what attention sees (a prompt before the tokens, a prefix in the keys) train on
    SQuAD end to end and score the re-split test's 2,464 questions, as the seed grid's SQuAD column does."""
    from unipelt.models import save_tiny_model
    from unipelt.train import RunConfig, run

    model = save_tiny_model(tmp_path / "tiny", max_position_embeddings=160)
    results = run(RunConfig(task="squad", method=method, method_options=options, model=model, data_dir=str(DATA),
                            out=str(tmp_path / "run"), device="cpu", k_shot=16, max_steps=2, eval_every=2,
                            batch_size=4, max_length=128, progress=False))
    assert (results["split"], results["report_examples"], results["main_metric"]) == ("test", 2_464, "f1")
    assert set(results["metrics"]) == {"exact_match", "f1"}
    assert 0.0 <= results["metrics"]["exact_match"] <= results["metrics"]["f1"] <= 100.0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["score"] == results["score"]
