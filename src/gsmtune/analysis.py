"""Error categories by checkable rules, run-vs-run comparison, contamination: on run folders alone (no model needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from itertools import combinations

from gsmtune.arithmetic import safe_eval
from gsmtune.gsm8k_format import ANNOTATION, CALCULATION, after_answer_line, normalize_question
from gsmtune.runs import Run, pieces, question_hash, training_speed
from gsmtune.stats import mcnemar_exact, paired_bootstrap_ci, wilson_ci

CATEGORIES = ("no_answer", "hallucinated_continuation", "truncated", "arithmetic", "reasoning")
CATEGORY_RULES = {
    "truncated": "generation hit max_new_tokens before a final answer",
    "hallucinated_continuation": "the model went on past its answer: started a new `Question:` or wrote more after `####`",
    "no_answer": "no `#### <number>` final answer: format not followed",
    "arithmetic": "a written calculation (`a op b = c` or `<<a op b=c>>`) whose result does not match its expression",
    "reasoning": "well-formed, arithmetic right, answer wrong",
}


def with_votes(runs: list[Run]) -> list[Run]:
    """Each self-consistency run is followed by its majority vote as a run of its own (`NAME maj@k`), so tables and
    paired tests put maj@k beside greedy and beside other runs, problem by problem."""
    out = []
    for r in runs:
        out.append(r)
        k = r.config.get("generation", {}).get("num_samples", 1)
        if k > 1 and r.predictions:
            votes = {i: p | {"correct": p["correct_majority"], "extracted_strict": p["majority_answer"],
                             "extracted_flexible": None, "correct_flexible": None}
                     for i, p in r.predictions.items()}
            correct, total = sum(p["correct"] for p in votes.values()), len(votes)
            out.append(replace(r, name=f"{r.name} maj@{k}", predictions=votes, metrics=r.metrics | {
                "correct": correct, "total": total, "accuracy": correct / total,
                "ci95": list(wilson_ci(correct, total)), "accuracy_flexible": None}))
    return out


# --- error categories -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calculation:
    expression: str
    written: str
    value: float | None

    @property
    def correct(self) -> bool:
        """Right up to the precision written: `10/3=3.33` is right, `3.5*60=200` is not."""
        try:
            written = float(self.written.replace("$", "").replace(",", ""))
        except ValueError:
            return True  # not a number: nothing to check
        if self.value is None:
            return True  # not plain arithmetic: nothing to check
        decimals = len(self.written.split(".")[1]) if "." in self.written else 0
        return abs(self.value - written) < 0.5 * 10**-decimals or abs(self.value - written) < 1e-9


def calculations(text: str) -> list[Calculation]:
    """GSM8K calculator annotations and inline `a op b = c` calculations, in order."""
    pairs = ANNOTATION.findall(text) + CALCULATION.findall(ANNOTATION.sub(" ", text))
    found: dict[tuple[str, str], Calculation] = {}  # `48/2 = <<48/2=24>>24` is one calculation, not two
    for expression, written in pairs:
        calc = Calculation(expression.strip(), written.strip(), safe_eval(expression))
        if calc.value is not None:
            found.setdefault((re.sub(r"\s", "", calc.expression), calc.written), calc)
    return list(found.values())


def continues_past_answer(completion: str) -> bool:
    """Text after the final-answer line (only possible when the stop rules were off)."""
    return bool(after_answer_line(completion).strip())


def categorize(row: dict) -> str | None:
    """The error category of a prediction (None when it is correct); the first rule that applies wins."""
    if row["correct"]:
        return None
    if row["stop_reason"] == "max_tokens":
        return "truncated"
    if row["stop_reason"] == "new_question" or continues_past_answer(row["completion"]):
        return "hallucinated_continuation"
    if row["extracted_strict"] is None:
        return "no_answer"
    if any(not c.correct for c in calculations(row["completion"])):
        return "arithmetic"
    return "reasoning"


@dataclass
class ErrorReport:
    total: int
    counts: dict[str, int]
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def rate(self, category: str) -> float:
        return self.counts[category] / self.total if self.total else 0.0


def error_report(run: Run, examples: int = 3) -> ErrorReport:
    counts = dict.fromkeys(CATEGORIES, 0)
    shown: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    for index in sorted(run.predictions):
        category = categorize(run.predictions[index])
        if category:
            counts[category] += 1
            if len(shown[category]) < examples:
                shown[category].append(run.predictions[index])
    return ErrorReport(total=len(run.predictions), counts=counts, examples=shown)


# --- comparison -------------------------------------------------------------------------------------------------


@dataclass
class PairedComparison:
    a: str
    b: str
    n: int  # shared problems
    acc_a: float
    acc_b: float
    only_a: int  # a right, b wrong ("broken" when b is the tuned run)
    only_b: int  # b right, a wrong ("fixed")
    both_right: int
    both_wrong: int
    p_value: float
    diff_ci: tuple[float, float]
    partial: bool  # the runs hold different problem sets: compared on their intersection

    @property
    def diff(self) -> float:
        return self.acc_b - self.acc_a


def shared_problems(a: Run, b: Run) -> list[int]:
    """Indices that name the same problem in both runs: a validation split and the test set share indices, not
    problems, so the question must match too."""
    return sorted(i for i in set(a.predictions) & set(b.predictions)
                  if a.predictions[i].get("question") == b.predictions[i].get("question"))


def compare_pair(a: Run, b: Run) -> PairedComparison:
    shared = shared_problems(a, b)
    ra = [bool(a.predictions[i]["correct"]) for i in shared]
    rb = [bool(b.predictions[i]["correct"]) for i in shared]
    only_a = sum(x and not y for x, y in zip(ra, rb, strict=True))
    only_b = sum(y and not x for x, y in zip(ra, rb, strict=True))
    n = len(shared)
    return PairedComparison(
        a=a.name, b=b.name, n=n, acc_a=sum(ra) / n if n else 0.0, acc_b=sum(rb) / n if n else 0.0,
        only_a=only_a, only_b=only_b, both_right=sum(x and y for x, y in zip(ra, rb, strict=True)),
        both_wrong=sum(not x and not y for x, y in zip(ra, rb, strict=True)), p_value=mcnemar_exact(only_a, only_b),
        diff_ci=paired_bootstrap_ci(ra, rb), partial=n < max(len(a.predictions), len(b.predictions)),
    )


def all_pairs(runs: list[Run]) -> list[PairedComparison]:
    """Every pair of runs that shares at least one problem."""
    return [c for a, b in combinations(runs, 2) if (c := compare_pair(a, b)).n > 0]


def summary_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        correct, total = r.metrics["correct"], r.metrics["total"]
        lo, hi = wilson_ci(correct, total)
        ref = (r.config.get("reference") or {}) if r.split == "test" else {}  # a test-set number: not beside validation
        rows.append({"run": r.name, "dataset": r.dataset, "method": r.method, "em": correct / total if total else 0.0,
                     "ci_low": lo, "ci_high": hi, "n": total, "flexible": r.metrics.get("accuracy_flexible"),
                     "reference_em": ref.get("accuracy"), "reference_source": ref.get("source") or None})
    return rows


def training_rows(runs: list[Run]) -> list[dict]:
    """What each trained run cost: examples, tokens, hours, speed, memory, as its train_metrics.json recorded them."""
    rows = []
    for r in runs:
        if not r.train_metrics:
            continue
        t = r.train_metrics
        rows.append({"run": r.name, "method": t.get("method"), "examples": t.get("train_examples"),
                     "epochs": t.get("epochs"), "tokens": t.get("tokens_seen"), "hours":
                     t["train_runtime_seconds"] / 3600 if t.get("train_runtime_seconds") else None,
                     "tokens_per_second": training_speed(t), "peak_gib": t.get("peak_memory_gib"),
                     "peak_kind": t.get("peak_memory_kind"), "device": t.get("device"), "precision": _precisions(r, t)})
    return rows


def _precisions(run: Run, train_metrics: dict) -> str | None:
    """The training's precision, piece by piece where a resumed training changed it (trained on another CPU)."""
    short = {"bfloat16": "bf16", "float32": "fp32"}
    seen = [short.get(p["dtype"], p["dtype"]) for p in pieces(run.provenance.get("train")) if p.get("dtype")]
    changes = [d for i, d in enumerate(seen) if i == 0 or d != seen[i - 1]]
    return " then ".join(changes) if len(changes) > 1 else train_metrics.get("precision")


def changed_problems(base: Run, tuned: Run) -> dict[str, list[int]]:
    """Problem indices by outcome: fixed (base wrong, tuned right), broken, both right, both wrong."""
    out: dict[str, list[int]] = {"fixed": [], "broken": [], "both_right": [], "both_wrong": []}
    for i in shared_problems(base, tuned):
        x, y = base.predictions[i]["correct"], tuned.predictions[i]["correct"]
        out["both_right" if x and y else "both_wrong" if not x and not y else "fixed" if y else "broken"].append(i)
    return out


# --- contamination ----------------------------------------------------------------------------------------------


def contamination(run: Run) -> tuple[list[int], list[int]] | None:
    """Eval problems whose question is among the training questions of the model evaluated: (exact, near-duplicate)
    indices, from the question hashes the run folder carries. None when it carries none (not trained by gsmtune)."""
    if not run.training_data:
        return None
    exact_set, near_set = set(run.training_data["exact"]), set(run.training_data["normalized"])
    exact, near = [], []
    for i, row in sorted(run.predictions.items()):
        if question_hash(row["question"].strip()) in exact_set:
            exact.append(i)
        elif question_hash(normalize_question(row["question"])) in near_set:
            near.append(i)
    return exact, near
