"""Fuzzing the task data loaders with damaged files: GLUE TSVs, JSONL text classification, SQuAD JSON, CoNLL NER.

Each generated data folder, read through the task API (``get_task(name).load(split, folder)``, then
``model_kwargs`` and ``featurize`` with the default tokenizer), either loads cleanly or raises ``TaskDataError``
whose message is one line naming the file (the folder's path is in it). Any other exception is a bug. Where a
load is refused, the ``unipelt train`` command on the same folder is refused too, with the bad-input exit code
and the same message (cheap: the data is read before any model). Damage: missing or extra columns, headers that
lack a column, labels outside the task's set, non-numeric and non-finite scores, empty files, bad UTF-8, NUL
bytes, BOMs, truncation; JSONL lines that are not JSON, not objects, lack keys or hold odd values; SQuAD documents
with keys missing, values of the wrong type, answers outside their context; CoNLL files with ragged columns,
tags unknown to the training split, lone words.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_support import check_message, examples, record
from unipelt.tasks import GLUE_LAYOUTS, TaskDataError, get_task

SETTINGS = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

WORDS = st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "日本", "🙂", "x" * 40, "'", '"',
                         "\\", "-", "O", "B-PER", "I-PER", "", " "])
TEXT = st.lists(WORDS, min_size=0, max_size=6).map(" ".join)
# byte-level damage applied to a whole file
FOLDER = b"<a folder in the file's place>"
BAD_BYTES = [b"\xff\xfe", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from unipelt.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@st.composite
def damaged_bytes(draw, data: bytes) -> bytes:
    """``data`` as written, or with bytes that break UTF-8 (or NUL, a BOM) put in, or truncated, or empty."""
    how = draw(st.sampled_from(["clean", "clean", "clean", "insert", "truncate", "empty", "clean", "folder"]))
    if how == "folder":
        return FOLDER
    if how == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from(BAD_BYTES)) + data[at:]
    if how == "truncate":
        return data[:draw(st.integers(0, len(data)))]
    if how == "empty":
        return b""
    return data


# ------------------------------------------------------------------------------------------------------ GLUE


@st.composite
def glue_files(draw) -> tuple[str, str, str, bytes]:
    """``(task, split, file name, bytes)``: a GLUE TSV in the task's layout, more or less damaged."""
    name = draw(st.sampled_from(sorted(GLUE_LAYOUTS)))
    lay = GLUE_LAYOUTS[name]
    split = draw(st.sampled_from(["train", "dev", "test"]))
    file_name = (lay.files or {}).get(split, f"{split}.tsv")
    header_mode = draw(st.sampled_from(["header", "header", "no_header", "missing_column", "extra_columns"]))
    labels = list(lay.labels) if lay.labels is not None else ["0.5", "3.8", "5", "-1"]
    wrong = ["2", "maybe", "", " ", "nan", "inf", "1e400", "-", "ENTAILMENT", "0.5.1"]
    if header_mode == "no_header":
        width = max(p for p in lay.positions if p is not None and p >= 0) + 2
        columns = [f"c{i}" for i in range(width)]
        places = [p if p is None or p >= 0 else width - 1 for p in lay.positions]
        header = None
    else:
        columns = ["index", *[n for n in lay.names if n is not None]]
        if header_mode == "missing_column":
            columns.remove(draw(st.sampled_from(columns[1:])))
        if header_mode == "extra_columns":
            columns.insert(draw(st.integers(0, len(columns))), "extra")
        places = [columns.index(n) if n in columns else None for n in lay.names]
        header = columns
    rows = []
    clean = draw(st.sampled_from(range(3))) == 1  # a third of the files have no damaged row
    for i in range(draw(st.integers(0, 5))):
        row = [draw(TEXT) for _ in columns]
        if places[2] is not None:
            row[places[2]] = draw(st.sampled_from(labels)) if clean or draw(st.sampled_from(range(4))) else \
                draw(st.sampled_from(wrong))
        shape = "ok" if clean else draw(st.sampled_from(["ok", "ok", "ok", "short", "long", "blank"]))
        if shape == "short":
            row = row[:draw(st.integers(0, max(0, len(row) - 1)))]
        elif shape == "long":
            row = row + ["more"]
        elif shape == "blank":
            row = []
        if row and not row[0]:
            row[0] = f"id{i}"
        rows.append(row)
    lines = ([header] if header is not None else []) + rows
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join("\t".join(r) for r in lines) + newline
    return name, split, file_name, draw(damaged_bytes(text.encode("utf-8")))


# ------------------------------------------------------------------------------------------------------ JSONL

JSON_VALUES = st.sampled_from([None, 0, 1, 1.5, float("nan"), True, "pos", "neg", "", [], ["pos"], {"a": 1}])


@st.composite
def jsonl_line(draw, clean: bool = False) -> str:
    kind = "ok" if clean else \
        draw(st.sampled_from(["ok", "ok", "ok", "ok", "missing", "odd", "not_json", "not_object", "blank"]))
    item: dict[str, Any] = {"text": draw(TEXT), "label": draw(st.sampled_from(["pos", "neg", 1, 0]))}
    if kind == "missing":
        del item[draw(st.sampled_from(["text", "label"]))]
    elif kind == "odd":
        item[draw(st.sampled_from(["text", "label"]))] = draw(JSON_VALUES)
    elif kind == "not_json":
        return draw(st.sampled_from(["{", "{'text': 'a', 'label': 1}", "text\tlabel", "[1,", "NaN x", "}",
                                     "[" * 5000 + "]" * 5000, '{"text": "a", "label": 1}}']))
    elif kind == "not_object":
        return draw(st.sampled_from(["[1, 2]", "3", "null", '"text"', "true", "[]"]))
    elif kind == "blank":
        return draw(st.sampled_from(["", " ", "\t"]))
    return json.dumps(item, ensure_ascii=draw(st.booleans()))


@st.composite
def jsonl_folders(draw) -> dict[str, bytes]:
    files = {}
    for split in draw(st.sampled_from([("train", "dev"), ("train", "dev", "test"), ("train",), ("dev",)])):
        lines = draw(st.lists(jsonl_line(clean=draw(st.sampled_from(range(3))) == 1), min_size=0, max_size=6))
        files[f"{split}.jsonl"] = draw(damaged_bytes(("\n".join(lines) + "\n").encode("utf-8")))
    return files


# ------------------------------------------------------------------------------------------------------ SQuAD

MISSING = object()


@st.composite
def squad_doc(draw) -> Any:
    """A SQuAD 1.1 document of one or two paragraphs, then one mutation: a key removed, a value of the wrong type,
    an answer moved outside its context or changed, the top level replaced."""
    context = "The cat sat on the mat in Paris in 1999."
    answers = [("cat", 4), ("Paris", 26), ("1999", 35), ("mat", 19)]
    qas = []
    for i in range(draw(st.integers(1, 3))):
        text, start = draw(st.sampled_from(answers))
        qas.append({"id": f"q{i}", "question": "Where?", "answers": [{"text": text, "answer_start": start}]})
    doc: Any = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    qa = qas[0]
    answer = qa["answers"][0]
    targets = {"doc": (doc, "data"), "article": (doc["data"][0], "paragraphs"),
               "paragraph": (doc["data"][0]["paragraphs"][0], draw(st.sampled_from(["context", "qas"]))),
               "qa": (qa, draw(st.sampled_from(["id", "question", "answers"]))),
               "answer": (answer, draw(st.sampled_from(["text", "answer_start"])))}
    mutation = draw(st.sampled_from(["none", "none", "delete", "retype", "outside", "top", "answers_odd"]))
    if mutation in ("delete", "retype"):
        obj, key = targets[draw(st.sampled_from(sorted(targets)))]
        if mutation == "delete":
            del obj[key]
        else:
            obj[key] = draw(st.sampled_from([None, 3, 2.5, True, "s", [], {}, [None], [1]]))
    elif mutation == "outside":
        answer["answer_start"] = draw(st.sampled_from([-1, -100, len(context), len(context) + 5, 10 ** 30, 5, 0]))
        answer["text"] = draw(st.sampled_from([answer["text"], "", "dog", context + " more", "cat sat on"]))
    elif mutation == "top":
        doc = draw(st.sampled_from([[], [doc], "data", None, 1, {"data": {}}, {"data": [None]},
                                    {"data": [{"paragraphs": [None]}]}]))
    elif mutation == "answers_odd":
        qa["answers"] = draw(st.sampled_from([[], [None], {"text": "cat"}, "cat", [{"text": "cat"}]]))
    return doc


@st.composite
def squad_folders(draw) -> dict[str, bytes]:
    files = {}
    for name in draw(st.sampled_from([("train.json", "dev.json"), ("train-v1.1.json",), ("dev.json",),
                                      ("resplit-train.json", "resplit-test.json")])):
        text = json.dumps(draw(squad_doc()), ensure_ascii=draw(st.booleans()))
        if draw(st.sampled_from(range(12))) == 5:  # nested past the JSON parser's recursion limit
            text = '{"data": ' + "[" * 100_000 + "]" * 100_000 + "}"
        files[name] = draw(damaged_bytes(text.encode("utf-8")))
    return files


# ------------------------------------------------------------------------------------------------------ CoNLL

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC"]


@st.composite
def conll_text(draw, tags: list[str]) -> str:
    lines = []
    if draw(st.booleans()):
        lines += ["-DOCSTART- -X- -X- O", ""]
    for _ in range(draw(st.integers(0, 3))):
        for _ in range(draw(st.integers(1, 4))):
            word = draw(st.sampled_from(["EU", "rejects", "German", "call", ".", "Peter", "naïve", "日本"]))
            tag = draw(st.sampled_from(tags))
            columns = draw(st.sampled_from([4, 4, 4, 2, 3, 5, 1, 0]))  # ragged: anything from a lone word on
            cells = [word, "NNP", "I-NP", tag][:max(columns - 1, 0)] + ([tag] if columns > 1 else [])
            if columns == 1:
                cells = [word]
            sep = draw(st.sampled_from([" ", "\t", "  "]))
            lines.append(sep.join(cells))
        lines.append("")
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))


@st.composite
def conll_folders(draw) -> dict[str, bytes]:
    files = {}
    for name in draw(st.sampled_from([("train.txt", "dev.txt"), ("train.txt", "valid.txt", "test.txt"),
                                      ("train.txt",), ("dev.txt",), ("train.txt", "testb.txt")])):
        tags = TAGS if name == "train.txt" else TAGS + ["B-ORG", "X"]  # dev/test may hold tags train lacks
        files[name] = draw(damaged_bytes(draw(conll_text(tags)).encode("utf-8")))
    return files


# ------------------------------------------------------------------------------------------------------ checks


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if data is FOLDER:
            (folder / name).mkdir(parents=True)
        else:
            (folder / name).write_bytes(data)


def load_all(task_name: str, folder: Path, splits: tuple[str, ...], tokenizer) -> list[str]:
    """Load each split through the task API (then the labels and features): how many splits loaded."""
    task = get_task(task_name)
    loaded = 0
    train = None
    for split in splits:
        try:
            examples_ = task.load(split, str(folder))
        except TaskDataError as e:
            message = check_message(e)
            assert str(folder) in message, f"the message does not name the file: {message!r}"
            continue
        assert isinstance(examples_, list)
        if split == "train":
            train = examples_
            kwargs = task.model_kwargs(train)
            assert kwargs.get("num_labels", 1) >= 1, f"a training split that loads gives no labels: {kwargs}"
        for ex in examples_:  # what loads is usable: finite scores, label indices in range
            label = getattr(ex, "label", None)
            if isinstance(label, float):
                assert math.isfinite(label), f"{split}: a non-finite score loaded"
        try:
            if train is not None:
                task.model_kwargs(train)
            features = task.featurize(examples_, tokenizer, 32)
        except TaskDataError as e:  # labels unknown without a train split, features of unusable examples
            check_message(e)
            continue
        # the trainer batches rows by the first row's keys: every row has the same ones, and training rows a target
        keys = {frozenset(row) for row in features.rows}
        assert len(keys) <= 1, f"{split}: rows with different keys {sorted(map(sorted, keys))} loaded from one file"
        if split != "test" and features.rows:
            assert keys & {frozenset(k) for k in keys if {"labels", "start_positions"} & k}, \
                f"{split}: examples without labels loaded"
        loaded += 1
    return loaded


def run_data_case(suite: str, task_name: str, files: dict[str, bytes], splits: tuple[str, ...], tokenizer) -> None:
    with tempfile.TemporaryDirectory(prefix="unipelt-fuzz-data-") as tmp:
        folder = Path(tmp)
        _write(folder, files)
        loaded = load_all(task_name, folder, splits, tokenizer)
    record(suite, "some split loaded" if loaded else "every split refused")


@settings(SETTINGS, max_examples=examples(300))
@given(case=glue_files())
def test_fuzzed_glue_tsv(case, tokenizer) -> None:
    name, split, file_name, data = case
    run_data_case("data/glue", name, {file_name: data}, (split,), tokenizer)


@settings(SETTINGS, max_examples=examples(150))
@given(files=jsonl_folders(), name=st.sampled_from(["text", "chemprot"]))
def test_fuzzed_jsonl(files, name, tokenizer) -> None:
    run_data_case("data/jsonl", name, files, ("train", "dev", "test"), tokenizer)


@settings(SETTINGS, max_examples=examples(150))
@given(files=squad_folders())
def test_fuzzed_squad_json(files, tokenizer) -> None:
    run_data_case("data/squad", "squad", files, ("train", "dev", "test"), tokenizer)


@settings(SETTINGS, max_examples=examples(150))
@given(files=conll_folders())
def test_fuzzed_conll(files, tokenizer) -> None:
    run_data_case("data/conll", "ner", files, ("train", "dev", "test"), tokenizer)


@settings(SETTINGS, max_examples=examples(12),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=glue_files())
def test_fuzzed_glue_through_the_cli(case, tmp_path_factory, capsys) -> None:
    """Where the task API refuses a training file, ``unipelt train`` refuses it too: exit code 2, the message."""
    from unipelt.cli import EXIT_BAD_INPUT, main

    name, _, _, data = case
    file_name = "train.tsv"
    folder = Path(tempfile.mkdtemp(prefix="unipelt-fuzz-cli-", dir=tmp_path_factory.getbasetemp()))
    (folder / file_name).write_bytes(data)
    try:
        get_task(name).load("train", str(folder))
    except TaskDataError as e:
        capsys.readouterr()
        code = main(["train", "--task", name, "--method", "lora", "--data-dir", str(folder), "--out",
                     str(folder / "out"), "--device", "cpu", "--no-progress", "--max-steps", "1"])
        err = capsys.readouterr().err
        assert code == EXIT_BAD_INPUT and str(e) in err, err
        record("data/cli", "refused")
        return
    record("data/cli", "loaded (not run)")


# The distinct failures the fuzz found, each (task, files, split): before its fix the load raised the exception in
# the comment (or loaded what the trainer cannot use); now each is a TaskDataError naming the file.
FUZZ_FINDS = [
    ("rte", {"dev.tsv": b"index\tsentence1\xff\xfe\tsentence2\tlabel\n"}, "dev"),  # UnicodeDecodeError
    ("mnli_mm", {"train.tsv": FOLDER}, "train"),  # IsADirectoryError
    ("stsb", {"train.tsv": b"index\tsentence1\tsentence2\tscore\n0\ta\tb\tinf\n"}, "train"),  # loaded score inf
    ("stsb", {"train.tsv": b"index\tsentence1\tsentence2\tscore\n0\ta\tb\tnan\n"}, "train"),  # loaded score NaN
    ("qqp", {"train.tsv": b"index\tquestion1\tquestion2\tis_duplicate\n0\ta\tb\t\n"}, "train"),  # unlabelled row
    ("qqp", {"dev.tsv": b"index\tquestion1\tquestion2\tis_duplicate\n0\ta\tb\t\n1\tc\td\t0\n"}, "dev"),  # mixed rows
    ("text", {"train.jsonl": b"\xff\xfe\n"}, "train"),  # UnicodeDecodeError
    ("text", {"train.jsonl": b"[" * 100_000 + b"\n"}, "train"),  # RecursionError
    ("text", {"train.jsonl": b'{"text": "a", "label": 1}\n', "dev.jsonl": FOLDER}, "dev"),  # IsADirectoryError
    ("text", {"train.jsonl": b"\n", "dev.jsonl": b"\n"}, "train"),  # loaded with no labels: num_labels 0
    ("text", {"train.jsonl": b'{"text": null, "label": 1}\n'}, "train"),  # loaded the text "None"
    ("text", {"train.jsonl": b'{"text": "a", "label": [1]}\n'}, "train"),  # loaded the label "[1]"
    ("squad", {"train-v1.1.json": FOLDER}, "train"),  # IsADirectoryError
    ("squad", {"dev.json": b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"}, "dev"),  # RecursionError
    ("squad", {"dev.json": json.dumps({"data": [{"paragraphs": [{"context": "The cat.", "qas": [
        {"id": "q0", "question": "Who?", "answers": []},
        {"id": "q1", "question": "Who?", "answers": [{"text": "cat", "answer_start": 4}]}]}]}]}).encode()},
     "dev"),  # a question without answers: rows of two layouts (KeyError in the trainer's batching)
    ("ner", {"train.txt": FOLDER}, "train"),  # IsADirectoryError
]


@pytest.mark.parametrize("task,files,split", FUZZ_FINDS, ids=lambda v: str(v)[:30])
def test_fuzz_finds_stay_fixed(task: str, files: dict[str, bytes], split: str, tmp_path: Path) -> None:
    _write(tmp_path, files)
    with pytest.raises(TaskDataError) as err:
        get_task(task).load(split, str(tmp_path))
    assert str(tmp_path) in check_message(err.value)
