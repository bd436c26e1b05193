"""Tasks: metrics against hand-computed values, GLUE loaders on the real data, k-shot sampling,
JSONL, SQuAD (windows, span decoding, EM/F1) and CoNLL NER (label alignment, entity F1)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from unipelt.tasks import GlueTask, JsonlTask, TaskDataError, get_task, hold_out, k_shot, metrics
from unipelt.tasks.ner import NerTask, TokenExample, read_conll
from unipelt.tasks.squad import QAExample, SquadTask, qa_logits

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIPELT_DATA_DIR", ROOT.parent / "shared" / "data"))
GLUE = DATA / "glue"
needs_data = pytest.mark.skipif(not GLUE.is_dir(), reason=f"GLUE data folder {GLUE} absent (set UNIPELT_DATA_DIR)")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from unipelt.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


# --- (a) metrics, by hand -----------------------------------------------------------------------

def test_accuracy():
    # pred 1 0 1 1 vs gold 1 1 1 0: positions 0 and 2 agree -> 2/4
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1])


def test_f1_binary():
    # pred 1 1 0 0 1, gold 1 0 1 0 1: tp = 2 (pos 0, 4), fp = 1 (pos 1), fn = 1 (pos 2)
    # F1 = 2tp / (2tp + fp + fn) = 4 / 6
    assert metrics.f1_binary([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(2 / 3)
    # no true positive -> 0
    assert metrics.f1_binary([0, 0], [1, 1]) == 0.0


def test_f1_macro():
    # pred 0 1 2 2, gold 0 1 1 2
    # class 0: tp 1, fp 0, fn 0 -> 1
    # class 1: tp 1 (pos 1), fp 0, fn 1 (pos 2) -> 2/3
    # class 2: tp 1 (pos 3), fp 1 (pos 2), fn 0 -> 2/3
    # mean = (1 + 2/3 + 2/3) / 3 = 7/9
    assert metrics.f1_macro([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(7 / 9)
    # a class only predicted counts too: pred 0 1, gold 0 0 -> class 0: 2*1/(2+0+1) = 2/3, class 1: 0 -> 1/3
    assert metrics.f1_macro([0, 1], [0, 0]) == pytest.approx(1 / 3)
    assert metrics.f1_micro([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75


def test_matthews():
    # confusion matrix: tp 3, tn 2, fp 1, fn 2
    pred = [1, 1, 1, 0, 0, 1, 0, 0]
    gold = [1, 1, 1, 0, 0, 0, 1, 1]
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (6 - 2) / sqrt(4*5*3*4) = 4 / sqrt(240)
    assert metrics.matthews(pred, gold) == pytest.approx(4 / math.sqrt(240))
    assert metrics.matthews(gold, gold) == pytest.approx(1.0)
    # a constant prediction has a zero denominator -> 0
    assert metrics.matthews([1, 1, 1], [1, 0, 1]) == 0.0


def test_pearson():
    # x 1 2 3 4 (mean 2.5), y 2 4 5 9 (mean 5): dx -1.5 -.5 .5 1.5, dy -3 -1 0 4
    # sxy = 4.5 + .5 + 0 + 6 = 11, sxx = 5, syy = 9 + 1 + 0 + 16 = 26 -> r = 11 / sqrt(130)
    assert metrics.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_with_ties():
    # ranks of x 1 2 2 3: 1, 2.5, 2.5, 4 (the tie shares ranks 2 and 3); ranks of y: 1 2 3 4
    assert metrics._ranks([1, 2, 2, 3]) == [1.0, 2.5, 2.5, 4.0]
    # both rank lists have mean 2.5: dx -1.5 0 0 1.5, dy -1.5 -.5 .5 1.5
    # sxy = 2.25 + 0 + 0 + 2.25 = 4.5, sxx = 4.5, syy = 5 -> rho = 4.5 / sqrt(22.5)
    assert metrics.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    # monotone but not linear -> exactly 1
    assert metrics.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


def test_squad_metric_functions():
    assert metrics.normalize_answer("The Cat!") == "cat"
    assert metrics.normalize_answer("  An  apple,  a day ") == "apple day"
    assert metrics.squad_exact("The Cat!", ["cat"]) == 1.0
    assert metrics.squad_exact("black cat", ["cat"]) == 0.0
    # "the black cat sat" -> black cat sat; "a black dog sat down" -> black dog sat down
    # common: black, sat = 2; precision 2/3, recall 2/4; F1 = 2 * (1/3) / (2/3 + 1/2) = 4/7
    assert metrics.squad_f1("the black cat sat", ["a black dog sat down"]) == pytest.approx(4 / 7)
    # the best reference counts: "black cat" vs "black cat sat": P 2/3, R 1 -> F1 0.8
    assert metrics.squad_f1("the black cat sat", ["x", "black cat"]) == pytest.approx(0.8)
    # EM: 1 and 0 -> 50%; F1: 1 and ("black cat sat" vs "black dog": P 1/3, R 1/2 -> 0.4) -> 70%
    scores = metrics.squad_scores(["The Cat!", "black cat sat"], [["cat"], ["black dog"]])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(70.0)


def test_entities_bio_and_iob1():
    bio = ["B-PER", "I-PER", "O", "B-LOC", "I-ORG", "I-ORG", "O", "I-MISC", "B-PER", "B-PER"]
    # PER 0-2; LOC 3-4 ends where the type switches; ORG 4-6 starts at I-ORG; a stray I-MISC after O
    # starts an entity; two B-PER in a row are two entities
    assert metrics.entities(bio) == {("PER", 0, 2), ("LOC", 3, 4), ("ORG", 4, 6), ("MISC", 7, 8), ("PER", 8, 9),
                                     ("PER", 9, 10)}
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-LOC"]
    # IOB1: I- starts entities, B- only separates two adjacent entities of one type; the last runs to the end
    assert metrics.entities(iob1) == {("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 6)}
    assert metrics.entities(["O", "O"]) == set()


def test_entity_f1_two_sentences():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]]
    # gold entities: PER 0-2, LOC 3-4 | ORG 0-1, MISC 2-3 -> 4
    # predicted:     PER 0-2, ORG 3-4 | ORG 0-1          -> 3, of which PER and ORG 0-1 are right -> tp 2
    # precision 2/3, recall 2/4, F1 = 2 * (1/3) / (2/3 + 1/2) = 4/7
    scores = metrics.entity_f1(pred, gold)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert metrics.entity_f1(gold, gold)["f1"] == 1.0


# --- (b) GLUE loaders on the real data ------------------------------------------------------------

COUNTS = {
    ("sst2", "train"): 67_349, ("sst2", "dev"): 872, ("sst2", "test"): 1_821,
    ("rte", "train"): 2_490, ("rte", "dev"): 277,
    ("cola", "train"): 8_551, ("cola", "dev"): 1_043,
    ("mrpc", "train"): 2_576, ("mrpc", "dev"): 1_500, ("mrpc", "test"): 1_725,
    ("stsb", "train"): 4_249, ("stsb", "dev"): 1_500, ("stsb", "test"): 1_500,
    ("wnli", "train"): 565, ("wnli", "dev"): 70,
}

FIRST = {
    ("sst2", "train"): ("hide new secretions from the parental units ", None, 0),
    ("rte", "train"): ("No Weapons of Mass Destruction Found in Iraq Yet.",
                       "Weapons of Mass Destruction Found in Iraq.", 1),  # not_entailment is label 1
    ("cola", "train"): ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
    ("mrpc", "train"): ('Amrozi accused his brother, whom he called "the witness", of deliberately distorting his '
                        'evidence.', 'Referring to him as only "the witness", Amrozi accused his brother of '
                        'deliberately distorting his evidence.', 1),
    ("mrpc", "test"): ("PCCW's chief operating officer, Mike Butcher, and Alex Arena, the chief financial officer, "
                       "will report directly to Mr So.", "Current Chief Operating Officer Mike Butcher and Group "
                       "Chief Financial Officer Alex Arena will report to So.", 1),
    ("stsb", "train"): ("A plane is taking off.", "An air plane is taking off.", 5.0),
    ("stsb", "test"): ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
    ("wnli", "dev"): ("Jackson was greatly influenced by Arnold, though he lived two centuries earlier.",
                      "Arnold lived two centuries earlier.", 1),
}


@needs_data
@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_glue_counts_and_labels(task, split):
    examples = GlueTask(task).load(split, str(GLUE))
    assert len(examples) == COUNTS[task, split]
    labels = [ex.label for ex in examples]
    if task == "stsb":
        assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in labels)
    else:
        assert all(isinstance(y, int) for y in labels)
        assert set(labels) == {0, 1}  # both classes, nothing else
    pair = task != "sst2" and task != "cola"
    assert all((ex.text_b is not None) == pair and ex.text_a for ex in examples)
    if (task, split) in FIRST:
        first = examples[0]
        assert (first.text_a, first.text_b, first.label) == FIRST[task, split]


@needs_data
def test_glue_data_dir_may_be_the_task_folder():
    examples = GlueTask("rte").load("dev", str(GLUE / "RTE"))
    assert len(examples) == 277
    assert get_task("SST-2").load("dev", str(GLUE))[0].label == 1


# --- (c) GLUE errors ------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_glue_wrong_column_layout(tmp_path):
    # SST-2's layout (sentence, label) given to RTE: the header lacks sentence1
    _write(tmp_path / "RTE" / "train.tsv", "sentence\tlabel\na fine film\t1\n")
    with pytest.raises(TaskDataError, match="sentence1"):
        GlueTask("rte").load("train", str(tmp_path))
    # header-less CoLA-like rows (4 columns) given to MRPC, which reads columns 0, 3 and 4
    _write(tmp_path / "MRPC" / "train.tsv", "gj04\t1\t\tThe sailors rode the breeze.\n")
    with pytest.raises(TaskDataError, match=r"train\.tsv:1: 4 columns"):
        GlueTask("mrpc").load("train", str(tmp_path))


def test_glue_header_without_a_pair_tasks_second_text(tmp_path):
    # RTE needs both sentences: a header without sentence2 is the wrong layout, not a one-sentence task
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tlabel\n0\tA man sleeps.\tentailment\n")
    with pytest.raises(TaskDataError, match="sentence2"):
        GlueTask("rte").load("dev", str(tmp_path))


def test_glue_header_without_labels_on_a_labelled_split(tmp_path):
    # STS-B's header (sentence1, sentence2, score) given to RTE: train/dev must not silently lose their labels
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(tmp_path / "RTE" / "train.tsv", header + "0\tg\tf\t2012\t1\tn\tn\tA plane.\tAn air plane.\t5.0\n")
    with pytest.raises(TaskDataError, match="label"):
        GlueTask("rte").load("train", str(tmp_path))
    # GLUE's unlabelled test files are fine: no label column, labels None
    _write(tmp_path / "RTE" / "test.tsv", "index\tsentence1\tsentence2\n0\tA man sleeps.\tA man rests.\n")
    [ex] = GlueTask("rte").load("test", str(tmp_path))
    assert (ex.text_a, ex.text_b, ex.label) == ("A man sleeps.", "A man rests.", None)


def test_glue_labels_outside_the_task(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\nodd\t2\n")
    with pytest.raises(TaskDataError, match=r"train\.tsv:3: label '2'"):
        GlueTask("sst2").load("train", str(tmp_path))
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(TaskDataError, match="'maybe'"):
        GlueTask("rte").load("train", str(tmp_path))
    _write(tmp_path / "STS-B" / "train.tsv", "\t".join(["x"] * 7 + ["a", "b", "high"]) + "\n")
    with pytest.raises(TaskDataError, match="not a number"):
        GlueTask("stsb").load("train", str(tmp_path))


def test_glue_missing_file_names_the_path(tmp_path):
    with pytest.raises(TaskDataError, match=str(tmp_path / "test.tsv")):
        GlueTask("wnli").load("test", str(tmp_path))


def test_unknown_task_lists_the_tasks():
    with pytest.raises(TaskDataError) as err:
        get_task("nope")
    for name in ("sst2", "rte", "stsb", "squad", "ner", "text"):
        assert name in str(err.value)
    assert isinstance(get_task("squad"), SquadTask)
    assert isinstance(get_task("ner"), NerTask)
    assert get_task("STS-B").name == "stsb"


# --- (d) sampling protocols -----------------------------------------------------------------------

def test_k_shot_is_deterministic_and_disjoint():
    data = list(range(100))
    train, val = k_shot(data, 8, seed=1)
    assert (train, val) == k_shot(data, 8, seed=1)
    assert k_shot(data, 8, seed=2) != (train, val)
    assert len(train) == len(val) == 8 and not set(train) & set(val)
    assert set(train) | set(val) <= set(data)


def test_k_shot_not_enough_data():
    with pytest.raises(TaskDataError, match="needs 12"):
        k_shot(list(range(10)), 6, seed=0)
    with pytest.raises(TaskDataError):
        k_shot(list(range(10)), 0, seed=0)
    train, val = k_shot(list(range(10)), 5, seed=0)  # exactly 2K is enough
    assert sorted(train + val) == list(range(10))


def test_hold_out():
    data = list(range(50))
    train, val = hold_out(data, seed=3)
    assert len(val) == 5 and len(train) == 45  # 10% of 50
    assert sorted(train + val) == data and not set(train) & set(val)
    assert train == sorted(train)  # the training examples keep their order
    assert hold_out(data, seed=3) == (train, val)
    assert hold_out(data, seed=4)[1] != val
    assert len(hold_out(list(range(30_000)), seed=0)[1]) == 1000  # capped at size
    assert len(hold_out(list(range(5)), seed=0)[1]) == 1  # at least one
    with pytest.raises(TaskDataError):
        hold_out([1], seed=0)


# --- (e) JSONL text classification ----------------------------------------------------------------

def _jsonl(path: Path, items) -> None:
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")


def test_jsonl_task(tmp_path, tokenizer):
    _jsonl(tmp_path / "train.jsonl", [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"},
                                      {"text": "fine", "label": "pos"}])
    _jsonl(tmp_path / "dev.jsonl", [{"text": "lovely", "label": "pos"}, {"text": "bad", "label": "neg"},
                                    {"text": "meh", "label": "neg"}, {"text": "nice", "label": "pos"}])
    task = get_task("text")
    assert isinstance(task, JsonlTask)
    dev = task.load("dev", str(tmp_path))  # the labels come from train even when dev is read first
    assert task.labels == ("neg", "pos")
    assert [(ex.text_a, ex.label) for ex in dev] == [("lovely", 1), ("bad", 0), ("meh", 0), ("nice", 1)]
    assert task.model_kwargs(dev)["id2label"] == {0: "neg", 1: "pos"}
    feats = task.featurize(dev, tokenizer, 16)
    assert [int(r["labels"]) for r in feats.rows] == [1, 0, 0, 1]
    # predictions 1 1 0 0 vs gold 1 0 0 1: accuracy 2/4; class 0: tp 1 fp 1 fn 1 -> 1/2, class 1 the same -> 1/2
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    scores = task.score(None, feats, dev, lambda rows: {"logits": logits[:len(rows)]})
    assert scores == {"f1_macro": 0.5, "accuracy": 0.5, "f1_micro": 0.5}


def test_jsonl_errors(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "great", "label": "pos"}])
    _jsonl(tmp_path / "dev.jsonl", [{"text": "so-so", "label": "neutral"}])
    with pytest.raises(TaskDataError, match="'neutral'"):
        JsonlTask().load("dev", str(tmp_path))
    (tmp_path / "test.jsonl").write_text('{"text": "x", "label": "pos"}\n{oops\n', encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"test\.jsonl:2: not JSON"):
        JsonlTask().load("test", str(tmp_path))
    _jsonl(tmp_path / "test.jsonl", [{"sentence": "x", "label": "pos"}])
    with pytest.raises(TaskDataError, match="'text' and 'label'"):
        JsonlTask().load("test", str(tmp_path))
    with pytest.raises(TaskDataError, match="train.jsonl"):
        JsonlTask().load("train", str(tmp_path / "elsewhere"))
    with pytest.raises(TaskDataError, match="--data-dir"):
        JsonlTask().load("train", None)


# --- (f) SQuAD ------------------------------------------------------------------------------------

SHORT = "Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903."
LONG = " ".join(f"Sentence number {i} talks about nothing in particular." for i in range(12)) + \
    " The lighthouse keeper was named Thomas Abernathy."


def _qa(qid, question, context, *answers):
    return {"id": qid, "question": question,
            "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}


def squad_doc() -> dict:
    return {"version": "1.1", "data": [
        {"title": "Curie", "paragraphs": [{"context": SHORT, "qas": [
            _qa("q1", "Where was Marie Curie born?", SHORT, "Warsaw"),
            _qa("q2", "When did she win the Nobel Prize in Physics?", SHORT, "1903", "in 1903")]}]},
        {"title": "Lighthouse", "paragraphs": [{"context": LONG, "qas": [
            _qa("q3", "Who was the lighthouse keeper?", LONG, "Thomas Abernathy")]}]},
    ]}


@pytest.fixture
def squad_dir(tmp_path) -> Path:
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(squad_doc()), encoding="utf-8")
    return tmp_path


def test_squad_load(squad_dir):
    task = SquadTask()
    examples = task.load("dev", str(squad_dir))
    assert [ex.id for ex in examples] == ["q1", "q2", "q3"]
    assert examples[1] == QAExample("q2", "When did she win the Nobel Prize in Physics?", SHORT, ["1903", "in 1903"],
                                    [SHORT.index("1903"), SHORT.index("in 1903")])
    (squad_dir / "train.json").write_text(json.dumps(squad_doc()), encoding="utf-8")
    assert len(task.load("train", str(squad_dir))) == 3  # train.json is accepted as well
    assert (task.kind, task.main_metric) == ("qa", "f1")
    assert task.auto_model_class().__name__ == "AutoModelForQuestionAnswering"


def test_squad_load_errors(tmp_path):
    task = SquadTask()
    with pytest.raises(TaskDataError, match="train-v1.1.json or .*train.json"):
        task.load("train", str(tmp_path))
    with pytest.raises(TaskDataError, match="test.json"):
        task.load("test", str(tmp_path))
    with pytest.raises(TaskDataError, match="no test"):
        task.load("test", None)  # the Hub has no SQuAD 1.1 test split either
    bad = tmp_path / "dev.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev\.json: not JSON"):
        task.load("dev", str(tmp_path))
    doc = squad_doc()
    del doc["data"][1]["paragraphs"][0]["qas"][0]["question"]
    bad.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev\.json: data\[1\]\.paragraphs\[0\]\.qas\[0\] lacks key 'question'"):
        task.load("dev", str(tmp_path))
    doc = squad_doc()
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 2
    bad.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev\.json: .*answer 'Warsaw' does not occur at answer_start"):
        task.load("dev", str(tmp_path))
    bad.write_text(json.dumps({"version": "1.1"}), encoding="utf-8")
    with pytest.raises(TaskDataError, match="lacks key 'data'"):
        task.load("dev", str(tmp_path))


def test_squad_hub_rows(monkeypatch):
    import unipelt.tasks.hub as hub

    calls = []

    def fake(path, config, split):
        calls.append((path, config, split))
        return [{"id": "a1", "title": "T", "context": SHORT, "question": "Where?",
                 "answers": {"text": ["Warsaw", "Warsaw"], "answer_start": [24, 24]}}]

    monkeypatch.setattr(hub, "load_hub_split", fake)
    [ex] = SquadTask().load("dev", None)
    assert calls == [("rajpurkar/squad", None, "validation")]
    assert ex == QAExample("a1", "Where?", SHORT, ["Warsaw", "Warsaw"], [24, 24])


MAX_LEN = 48


@pytest.fixture
def squad_features(squad_dir, tokenizer):
    task = SquadTask()
    examples = task.load("dev", str(squad_dir))
    return task, examples, task.featurize(examples, tokenizer, MAX_LEN)


def test_squad_features_windows_and_positions(squad_features, tokenizer):
    task, examples, feats = squad_features
    index = feats.extra["example_index"]
    assert len(tokenizer(LONG)["input_ids"]) > MAX_LEN
    assert index.count(0) == 1 and index.count(1) == 1 and index.count(2) > 2  # the long context: several windows
    assert index == sorted(index)
    found = {0: 0, 1: 0, 2: 0}
    for r, row in enumerate(feats.rows):
        ids, types, offsets = row["input_ids"].tolist(), row["token_type_ids"].tolist(), feats.extra["offsets"][r]
        assert len(ids) <= MAX_LEN and len(offsets) == len(ids)
        ex = examples[index[r]]
        for t, (tok, off) in enumerate(zip(tokenizer.convert_ids_to_tokens(ids), offsets, strict=True)):
            if off is None:  # question and special tokens
                assert types[t] == 0 or tok == "[SEP]"
            else:  # context tokens map back to their text
                assert types[t] == 1 and tok not in ("[CLS]", "[SEP]")
                assert ex.context[off[0]:off[1]].lower() == tok.removeprefix("##")
        start, end = int(row["start_positions"]), int(row["end_positions"])
        answer_start, answer_end = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
        inside = [o for o in offsets if o is not None]
        if inside[0][0] <= answer_start and answer_end <= inside[-1][1]:
            assert 0 < start <= end
            assert ex.context[offsets[start][0]:offsets[end][1]] == ex.answers[0]
            found[index[r]] += 1
        else:
            assert (start, end) == (0, 0)  # the answer is not in this window: point at CLS
    assert found[0] == found[1] == 1 and found[2] >= 1
    assert any(int(r["start_positions"]) == 0 for r, i in zip(feats.rows, index, strict=True) if i == 2)


def _fake_predict(feats, examples, place):
    """Logits 0 everywhere, 10 where ``place`` says, rows padded with 50 (padding must never be read)."""
    width = max(len(r["input_ids"]) for r in feats.rows)

    def predict(rows):
        assert rows is feats.rows
        start = torch.full((len(rows), width), 50.0)
        end = torch.full((len(rows), width), 50.0)
        for r, row in enumerate(rows):
            n = len(row["input_ids"])
            start[r, :n] = 0.0
            end[r, :n] = 0.0
            offsets = feats.extra["offsets"][r]
            ex = examples[feats.extra["example_index"][r]]
            for t_start, t_end in place(ex, offsets):
                start[r, t_start] = 10.0
                end[r, t_end] = 10.0
        return {"start_logits": start, "end_logits": end}

    return predict


def _gold_tokens(ex, offsets, shift=0):
    """The tokens where the first answer starts and ends (both in this window), the end moved by ``shift``."""
    a, b = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
    starts = [t for t, o in enumerate(offsets) if o is not None and o[0] == a]
    ends = [t for t, o in enumerate(offsets) if o is not None and o[1] == b]
    return [(starts[0], ends[0] + shift)] if starts and ends else []


def test_squad_score_perfect(squad_features):
    task, examples, feats = squad_features
    predict = _fake_predict(feats, examples, _gold_tokens)
    assert task.best_answers(feats, examples, *qa_logits(predict(feats.rows))) == ["Warsaw", "1903",
                                                                                  "Thomas Abernathy"]
    assert task.score(None, feats, examples, predict) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_score_partial_and_wrong(squad_features):
    task, examples, feats = squad_features
    # the end one token late: "Warsaw in" (EM 0; P 1/2, R 1 -> F1 2/3), "1903." and "Thomas Abernathy."
    # (punctuation is normalised away: EM 1, F1 1) -> EM 2/3, F1 (2/3 + 1 + 1) / 3 = 8/9
    late = _fake_predict(feats, examples, lambda ex, off: _gold_tokens(ex, off, shift=1))
    assert task.best_answers(feats, examples, *qa_logits(late(feats.rows))) == ["Warsaw in", "1903.",
                                                                               "Thomas Abernathy."]
    scores = task.score(None, feats, examples, late)
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(800 / 9)
    # every window points at its first context token: "Marie", "Marie", "Sentence" -> nothing right
    first = _fake_predict(feats, examples, lambda ex, off: [(off.index(next(o for o in off if o)),) * 2])
    assert task.score(None, feats, examples, first) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_span_rules(tokenizer):
    context = "alpha beta gamma delta epsilon zeta eta theta"
    ex = QAExample("x", "which?", context, ["gamma"], [context.index("gamma")])
    task = SquadTask()
    feats = task.featurize([ex], tokenizer, 64)
    offsets = feats.extra["offsets"][0]
    c = offsets.index(next(o for o in offsets if o))  # first context token ("alpha"); one token per word here
    assert [context[o[0]:o[1]] for o in offsets if o] == context.split()
    n = len(offsets)
    start, end = torch.zeros(1, n), torch.zeros(1, n)
    start[0, 1] = 30.0  # a question token: never a span start
    start[0, c + 3] = 10.0  # delta
    end[0, c + 1] = 10.0  # beta: before the start, not a span
    end[0, c + 4] = 5.0  # epsilon
    assert task.best_answers(feats, [ex], start, end) == ["delta epsilon"]
    # at most max_answer_tokens tokens: alpha..zeta (6 tokens) is too long for 2, alpha..beta is not
    start, end = torch.zeros(1, n), torch.zeros(1, n)
    start[0, c] = 10.0
    end[0, c + 5] = 10.0
    end[0, c + 1] = 1.0
    assert SquadTask(max_answer_tokens=2).best_answers(feats, [ex], start, end) == ["alpha beta"]
    assert SquadTask().best_answers(feats, [ex], start, end) == ["alpha beta gamma delta epsilon zeta"]
    # the stacked-tensor form of the output reads the same
    s, e = qa_logits(torch.stack([start, end], dim=-1))
    assert torch.equal(s, start) and torch.equal(e, end)


def test_squad_long_question_is_clipped(tokenizer):
    ex = QAExample("x", "why " * 60 + "?", SHORT, ["Warsaw"], [SHORT.index("Warsaw")])
    feats = SquadTask().featurize([ex], tokenizer, 32)
    assert all(len(r["input_ids"]) <= 32 for r in feats.rows)
    assert all(sum(o is not None for o in off) >= 10 for off in feats.extra["offsets"])  # room for context
    assert any(int(r["start_positions"]) > 0 for r in feats.rows)


# --- (g) NER --------------------------------------------------------------------------------------

TRAIN_CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""

DEV_CONLL = """Peter B-PER
Blackburn I-PER
visited O
Johannesburg B-LOC
unbelievably O
quickly O

EU B-ORG
rejects O
German B-MISC
lamb O
"""

LABELS = ("O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER")


@pytest.fixture
def conll_dir(tmp_path) -> Path:
    _write(tmp_path / "train.txt", TRAIN_CONLL)
    _write(tmp_path / "valid.txt", DEV_CONLL)
    return tmp_path


def test_ner_load(conll_dir):
    task = NerTask()
    dev = task.load("dev", str(conll_dir))  # valid.txt; the labels are read from train.txt first
    assert task.labels == LABELS
    assert dev[1] == TokenExample(["EU", "rejects", "German", "lamb"], ["B-ORG", "O", "B-MISC", "O"])
    train = task.load("train", str(conll_dir))
    assert [ex.tokens for ex in train] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"],
                                           ["BRUSSELS", "1996-08-22"]]
    kwargs = task.model_kwargs(train)
    assert kwargs["num_labels"] == 6 and kwargs["id2label"][4] == "B-PER" and kwargs["label2id"]["O"] == 0
    assert task.auto_model_class().__name__ == "AutoModelForTokenClassification"
    _write(conll_dir / "testb.txt", "EU B-ORG\n")
    assert task.load("test", str(conll_dir)) == [TokenExample(["EU"], ["B-ORG"])]


def test_ner_load_errors(conll_dir):
    _write(conll_dir / "dev.txt", "Paris B-LOC\nSeine I-LOC\n")  # dev.txt is preferred over valid.txt
    with pytest.raises(TaskDataError, match=r"dev\.txt, sentence 1: tag\(s\) \['I-LOC'\]"):
        NerTask().load("dev", str(conll_dir))
    _write(conll_dir / "train.txt", "EU B-ORG\nrejects\n")
    with pytest.raises(TaskDataError, match=r"train\.txt:2: one column"):
        read_conll(conll_dir / "train.txt")
    with pytest.raises(TaskDataError, match=r"test\.txt or .*testb\.txt"):
        NerTask().load("test", str(conll_dir))


def test_ner_hub_rows(monkeypatch):
    import unipelt.tasks.hub as hub

    class FakeSplit(list):
        features = {"ner_tags": type("Seq", (), {"feature": type("CL", (), {"names": ["O", "B-PER", "I-PER"]})})}

    calls = []

    def fake(path, config, split):
        calls.append((path, split))
        return FakeSplit([{"tokens": ["Peter", "Blackburn", "ran"], "ner_tags": [1, 2, 0]}, {"tokens": [],
                                                                                             "ner_tags": []}])

    monkeypatch.setattr(hub, "load_hub_split", fake)
    task = NerTask()
    assert task.load("dev", None) == [TokenExample(["Peter", "Blackburn", "ran"], ["B-PER", "I-PER", "O"])]
    assert calls == [("eriktks/conll2003", "validation"), ("eriktks/conll2003", "train")]
    assert task.labels == ("O", "B-PER", "I-PER")


def test_ner_label_alignment(conll_dir, tokenizer):
    task = NerTask()
    dev = task.load("dev", str(conll_dir))
    feats = task.featurize(dev, tokenizer, 64)
    # [CLS] peter blackburn visited johannesburg un ##bel ##ie ##va ##bly quickly [SEP]
    o, b_loc, b_misc, b_org, b_per, i_per = range(6)
    assert tokenizer.convert_ids_to_tokens(feats.rows[0]["input_ids"])[5:10] == ["un", "##bel", "##ie", "##va", "##bly"]
    assert feats.rows[0]["labels"].tolist() == [-100, b_per, i_per, o, b_loc, o, -100, -100, -100, -100, o, -100]
    assert feats.rows[1]["labels"].tolist() == [-100, b_org, o, b_misc, o, -100]
    assert feats.extra["word_ids"][0] == [None, 0, 1, 2, 3, 4, 4, 4, 4, 4, 5, None]
    assert feats.rows[0]["labels"].shape == feats.rows[0]["input_ids"].shape


def _ner_predict(examples, tokenizer, feats, tags_of, later=None):
    """One-hot logits: each word's first sub-token gets ``tags_of(ex)``'s tag, later sub-tokens ``later``."""
    width = max(len(r["input_ids"]) for r in feats.rows)
    labels = list(LABELS)

    def predict(rows):
        logits = torch.zeros(len(rows), width, len(labels))
        logits[:, :, labels.index("B-MISC")] = 0.5  # a wrong guess everywhere that must lose to the one-hots
        for r, ex in enumerate(examples):
            word_ids = tokenizer(ex.tokens, is_split_into_words=True, truncation=True,
                                 max_length=len(rows[r]["input_ids"]))
            previous = None
            for t, w in enumerate(word_ids.word_ids()):
                if w is not None:
                    tag = tags_of(ex)[w] if w != previous or later is None else later
                    logits[r, t, labels.index(tag)] = 1.0
                previous = w
        return {"logits": logits}

    return predict


def test_ner_score(conll_dir, tokenizer):
    task = NerTask()
    dev = task.load("dev", str(conll_dir))
    feats = task.featurize(dev, tokenizer, 64)
    gold = _ner_predict(dev, tokenizer, feats, lambda ex: ex.tags, later="B-ORG")  # later sub-tokens do not count
    assert task.score(None, feats, dev, gold) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # Johannesburg predicted B-ORG: gold PER, LOC | ORG, MISC; predicted PER, ORG | ORG, MISC -> tp 3 of 4 and 4
    wrong = [["B-PER", "I-PER", "O", "B-ORG", "O", "O"], ["B-ORG", "O", "B-MISC", "O"]]
    scores = task.score(None, feats, dev, _ner_predict(dev, tokenizer, feats, lambda ex: wrong[dev.index(ex)]))
    assert scores == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75})


def test_ner_truncated_words_are_o(conll_dir, tokenizer):
    task = NerTask()
    dev = task.load("dev", str(conll_dir))
    feats = task.featurize(dev, tokenizer, 5)
    # [CLS] peter blackburn visited [SEP]: Johannesburg (B-LOC) is cut and counts as "O";
    # [CLS] eu rejects german [SEP]: only "lamb" (O) is cut.
    assert feats.extra["word_ids"] == [[None, 0, 1, 2, None], [None, 0, 1, 2, None]]
    predict = _ner_predict(dev, tokenizer, feats, lambda ex: ex.tags)
    assert task.predicted_tags(feats, dev, predict(feats.rows)["logits"])[0] == ["B-PER", "I-PER", "O", "O", "O", "O"]
    # predicted PER | ORG, MISC, all right: precision 3/3, recall 3/4 -> F1 = 2 * 0.75 / 1.75 = 6/7
    assert task.score(None, feats, dev, predict) == pytest.approx({"precision": 1.0, "recall": 0.75, "f1": 6 / 7})
