import base64
import json
from html.parser import HTMLParser

from conftest import row, write_run

from gsmtune.cli import main
from gsmtune.runs import write_provenance, write_training_data


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.headings, self._in_h = [], 0, [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        self.tables += tag == "table"
        if tag in ("h1", "h2", "h3"):
            self._in_h = True
            self.headings.append("")

    def handle_endtag(self, tag):
        self._in_h = self._in_h and tag not in ("h1", "h2", "h3")

    def handle_data(self, data):
        if self._in_h:
            self.headings[-1] += data


def fixture_runs(root):
    question = {3: "q3", 4: "Tom has 7 apples"}.get  # the same problems in both runs
    base = write_run(root / "base", [row(" #### 24" if i < 2 else " no", index=i, stop="eos",
                                         question=question(i, f"question {i}?")) for i in range(10)],
                     config="prompt:\n  strategy: one_shot\n")
    tuned_dir = root / "lora"
    write_run(tuned_dir, [row(" 48/2=<<48/2=24>>24\n#### 24" if i != 1 else " 48/2=<<48/2=25>>25\n#### 25", index=i,
                              question=question(i, f"question {i}?")) for i in range(10)],
              config=f"baseline_run: {root / 'base'}\ndataset:\n  config_name: main\n  source: local\n"
                     "reference:\n  accuracy: 0.2\n  source: gemma-2b-it, 100 problems\n")
    write_training_data(tuned_dir, ["q3", "Tom has 5 apples"])  # eval question 3 verbatim, question 4 with other numbers
    (tuned_dir / "train_metrics.json").write_text(json.dumps(
        {"method": "lora", "loss_curve": [{"step": s, "loss": 2.0 / s} for s in range(1, 6)], "train_examples": 2,
         "epochs": 1.0, "tokens_seen": 12345, "train_runtime_seconds": 5400, "tokens_per_second": 7.5,  # the last piece's
         "peak_memory_gib": 3.25, "peak_memory_kind": "process peak RSS", "device": "cpu", "precision": "bf16"}))
    return base


def test_report_html_and_markdown(tmp_path, capsys):
    fixture_runs(tmp_path / "runs")
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "runs"), "-o", str(out)]) == 0
    page = Collect()
    page.feed(out.read_text())
    pngs = [i for i in page.images if i["src"].startswith("data:image/png;base64,")]
    assert {i["alt"] for i in pngs} == {"accuracy", "training loss", "error categories"}
    for img in pngs:
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.tables >= 4  # accuracy, pairs, an error table per run, fixed/broken
    assert "base vs lora" in " ".join(page.headings).replace("`", "")
    md = (tmp_path / "report.md").read_text()
    assert "| lora | main (local) | lora SFT | 90.0 |" in md and "report_files/accuracy.png" in md
    assert "| 20.0 [1] |" in md and "[1] gemma-2b-it, 100 problems" in md  # the reference beside ours, with its source
    assert "| lora | lora | 2 | 1.00 | 12,345 | 1.50 | 2 | 3.2 (process peak RSS) | cpu, bf16 |" in md
    assert (tmp_path / "report_files" / "loss.png").exists()
    assert "**fixed**: problem 2" in md and "arithmetic" in md
    assert "Contamination warning**: 1 eval questions appear verbatim" in md and "and 1 more as near-duplicates" in md


def test_a_training_resumed_in_another_precision_says_so_in_its_row(tmp_path):
    fixture_runs(tmp_path / "runs")
    lora = tmp_path / "runs" / "lora"
    for dtype in ("bfloat16", "bfloat16", "float32"):  # three pieces: two on a bf16 CPU, the last on one without
        write_provenance(lora, "train", "cpu", dtype, continues=True)
    assert main(["report", str(lora), "-o", str(tmp_path / "r.html")]) == 0
    assert "| 3.2 (process peak RSS) | cpu, bf16 then fp32 |" in (tmp_path / "r.md").read_text()


def test_report_takes_several_folders_and_pairs_table_adjusts_for_its_size(tmp_path, capsys):
    fixture_runs(tmp_path / "runs")
    write_run(tmp_path / "more" / "again", [row(" #### 24" if i < 2 else " no", index=i, stop="eos",
                                                question={3: "q3", 4: "Tom has 7 apples"}.get(i, f"question {i}?"))
                                            for i in range(10)])
    assert main(["report", str(tmp_path / "runs" / "base"), str(tmp_path / "runs" / "lora"), str(tmp_path / "more"),
                 "-o", str(tmp_path / "r.html")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert {"| base |", "| lora |", "| again |"} <= {line[:line.index(" |", 2) + 2] for line in md.splitlines()
                                                     if line.startswith("| ")}
    # 3 pairs: lora vs base and vs its copy (1 vs 8 discordant: p 0.0391, Holm x 3), base vs its copy (p 1)
    assert "| Holm p (of 3) |" in md and md.count("| 0.0391 | 0.117 |") == 2 and "| 1 | 1 |" in md


def test_runs_under_several_folders_once_each_and_named_apart(tmp_path):
    from gsmtune.runs import find_runs_in

    fixture_runs(tmp_path / "a")
    fixture_runs(tmp_path / "b")
    assert sorted(r.name for r in find_runs_in([tmp_path / "a", tmp_path / "a" / "lora"])) == ["base", "lora"]
    assert sorted(r.name for r in find_runs_in([tmp_path / "a", tmp_path / "b"])) == ["a/base", "a/lora", "b/base",
                                                                                     "b/lora"]


def test_compare_and_analyze_cli(tmp_path, capsys):
    fixture_runs(tmp_path / "runs")
    base, lora = str(tmp_path / "runs" / "base"), str(tmp_path / "runs" / "lora")
    assert main(["compare", base, lora, "--csv", str(tmp_path / "t.csv"), "--markdown", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert "McNemar p" in out and "+70.0" in out and "0.0391" in out
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("run,dataset,method,em")
    assert main(["analyze", lora, "--baseline", base]) == 0
    out = capsys.readouterr().out
    assert "| arithmetic | 1 | 10.0 |" in out and "| 8 | 1 | 1 | 0 |" in out


def test_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "is not a finished evaluation run" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err


def test_model_text_is_verbatim_code_clipped_and_escaped_in_html():
    from gsmtune.report import _quote, markdown_to_html

    assert _quote("write <<2*3=6>> <b>#### 6</b>") == "    write <<2*3=6>> <b>#### 6</b>"
    html = markdown_to_html("Completion:\n\n" + _quote("write <<2*3=6>> <b>#### 6</b>"))
    assert "&lt;&lt;2*3=6&gt;&gt; &lt;b&gt;" in html and "<b>" not in html
    long = _quote("\n".join(f"Answer: {i}" for i in range(50)))
    assert long.count("\n") == 11 and long.endswith(" [...]")
