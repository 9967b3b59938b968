import json

import pytest
from conftest import PROBLEMS, write_jsonl

from gsmtune.config import load_config
from gsmtune.data import eval_subset, load_split, symbolic_rows, symbolic_templates
from gsmtune.errors import GsmtuneError


def local(path, *more):
    return load_config(None, ["dataset.source=local", f"dataset.path={path}", *more]).dataset


def test_local_main_and_socratic(gsm_dir):
    main = load_split(local(gsm_dir), "test")
    assert [(p.question, p.answer) for p in main] == PROBLEMS
    assert [p.index for p in main] == list(range(len(PROBLEMS)))
    socratic = load_split(local(gsm_dir, "dataset.config_name=socratic"), "train")
    assert socratic[0].answer.startswith("Why? ** ")


def test_local_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pd.DataFrame([{"question": q, "answer": a} for q, a in PROBLEMS]).to_parquet(tmp_path / "test.parquet")
    assert len(load_split(local(tmp_path), "test")) == len(PROBLEMS)


def test_malformed_json_names_file_and_line(gsm_dir):
    lines = (gsm_dir / "test.jsonl").read_text().splitlines()
    lines[2] = '{"question": "broken'
    (gsm_dir / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(GsmtuneError, match=r"test.jsonl:3: not valid JSON"):
        load_split(local(gsm_dir), "test")


@pytest.mark.parametrize(
    ("row", "message"),
    [({"question": "q"}, "'question' and 'answer'"), ({"question": "q", "answer": "no final line"}, "####"),
     (["q", "a"], "'question' and 'answer'")],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    write_jsonl(tmp_path / "test.jsonl", [{"question": "ok", "answer": "#### 1"}, row])
    with pytest.raises(GsmtuneError, match=rf"test.jsonl:2: .*{message}"):
        load_split(local(tmp_path), "test")


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(GsmtuneError, match="is not a folder"):
        load_split(local(tmp_path / "nope"), "test")
    with pytest.raises(GsmtuneError, match="no test_socratic.jsonl"):
        load_split(local(tmp_path, "dataset.config_name=socratic"), "test")


def test_hub_failure_is_one_line_with_the_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GsmtuneError, match="dataset.source=local") as e:
        load_split(load_config(None).dataset, "test")
    assert "\n" not in str(e.value)


def test_hub_rows_become_problems(monkeypatch):
    import datasets

    calls = []

    def fake(name, config_name, split):
        calls.append((name, config_name, split))
        return [{"question": q, "answer": a} for q, a in PROBLEMS[:2]]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    problems = load_split(load_config(None, ["dataset.config_name=socratic"]).dataset, "test")
    assert calls == [("openai/gsm8k", "socratic", "test")] and len(problems) == 2


def test_symbolic_split_by_template():
    train_ids, test_ids = symbolic_templates(0.2)
    assert not set(train_ids) & set(test_ids) and len(test_ids) == round(85 * 0.2)
    test = symbolic_rows("test", 0, 20, 0.2)
    train = symbolic_rows("train", 40, 0, 0.2)
    assert len(test) == 20 and len(train) == 40
    assert all("####" in r["answer"] for r in test + train)
    assert symbolic_rows("test", 0, 20, 0.2) == test  # deterministic
    ds = load_config(None, ["dataset.source=symbolic", "dataset.symbolic_test_size=5"]).dataset
    assert [p.question for p in load_split(ds, "test")] == [r["question"] for r in test[:5]]


def test_eval_subset_is_seeded_and_stable():
    problems = load_split(load_config(None, ["dataset.source=symbolic", "dataset.symbolic_test_size=50"]).dataset,
                          "test")
    a = eval_subset(problems, 10, seed=1)
    assert [p.index for p in a] == [p.index for p in eval_subset(problems, 10, seed=1)]
    assert [p.index for p in a] != [p.index for p in eval_subset(problems, 10, seed=2)]
    assert [p.index for p in a] == sorted(p.index for p in a)
    assert eval_subset(problems, None, seed=1) == problems
    with pytest.raises(GsmtuneError, match="num_eval_samples=51 is larger than the split"):
        eval_subset(problems, 51, seed=1)


def test_local_reader_takes_files_as_people_write_them(tmp_path):
    """Windows line ends, blank lines, no final newline, non-ASCII text, extra fields: gsmtune's own reader copes."""
    rows = [{"question": "Zoë paid €1,200. How much?", "answer": "1200 = <<1200=1200>>1200\n#### 1,200", "id": 7},
            {"question": "Two?", "answer": "#### 2"}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:1]) + "\r\n\r\n" + json.dumps(rows[1])
    (tmp_path / "test.jsonl").write_bytes(text.encode("utf-8"))
    problems = load_split(local(tmp_path), "test")
    assert [(p.index, p.question, p.answer) for p in problems] == [(i, r["question"], r["answer"]) for i, r in enumerate(rows)]
