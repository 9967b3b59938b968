"""Run lm-evaluation-harness's HF backend on a local GSM8K jsonl; runs inside lm-eval's own virtual environment.

Called by bench_eval.py: python lm_eval_worker.py PROBLEMS.jsonl MODEL_DIR DTYPE BATCH_SIZE MAX_NEW_TOKENS OUT.json
"""

import json
import sys
import tempfile
import time
from pathlib import Path

# lm-eval's gsm8k task at zero shots, pointed at a local file; `until` matches gsmtune's new-question stop rule.
TASK = """task: gsm8k_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {problems}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["\\nQuestion:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_new_tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    problems, model_dir, dtype, batch_size, max_new_tokens, out = sys.argv[1:7]
    start = time.perf_counter()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    imported = time.perf_counter()
    task_dir = Path(tempfile.mkdtemp())
    (task_dir / "gsm8k_bench.yaml").write_text(TASK.format(problems=problems, max_new_tokens=max_new_tokens))
    # add_bos_token: Gemma needs its BOS, and gsmtune's prompt carries exactly one
    lm = HFLM(pretrained=model_dir, dtype=dtype, device="cpu", batch_size=int(batch_size), add_bos_token=True)
    results = simple_evaluate(model=lm, tasks=["gsm8k_bench"], task_manager=TaskManager(include_path=str(task_dir)),
                              num_fewshot=0, log_samples=True)
    seconds = time.perf_counter() - imported
    samples = sorted(results["samples"]["gsm8k_bench"], key=lambda s: s["doc_id"])
    Path(out).write_text(json.dumps({
        "seconds": seconds,
        "import_seconds": imported - start,
        "completions": [s["resps"][0][0] for s in samples],
        "prompts": [s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict) else s["arguments"][0][0]
                    for s in samples],
    }))


if __name__ == "__main__":
    main()
