import pytest
import torch

from gsmtune.calculator import Calculator, format_result, pending_result


@pytest.mark.parametrize(
    ("text", "forced"),
    [
        ("She sold <<48/2=", "24>>"),
        ("total <<((1+2)*(3+4))/7=", "3>>"),
        ("each <<10/4=", "2.5>>"),
        ("<<10/3=", "3.333333>>"),
        ("<<1,200*2=", "2400>>"),
        ("<<5-8=", "-3>>"),
        ("<<48/=", None),  # malformed: left to the model
        ("<<48/2=24>> and", None),  # closed already
        ("48/2=", None),  # not an annotation
        ("<<48/0=", None),
    ],
)
def test_pending_result(text, forced):
    assert pending_result(text) == forced


def test_format_result():
    assert (format_result(24.0), format_result(2.5), format_result(-0.125)) == ("24", "2.5", "-0.125")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def text(tok, row):
    return tok.decode(row, skip_special_tokens=True)


def test_calculator_forces_only_the_row_that_calls(tiny_tokenizer):
    tok = tiny_tokenizer
    calc = Calculator(tok, batch_size=2)
    rows = [ids(tok, " so <<(3+4)*2="), ids(tok, " so 3+4=")]
    expected = ids(tok, "14>>")
    for want in expected:
        rows[0].append(calc.next_token(0, text(tok, rows[0]), chosen=5))  # the "model" would write token 5 everywhere
        rows[1].append(calc.next_token(1, text(tok, rows[1]), chosen=5))
        assert rows[0][-1] == want and rows[1][-1] == 5
    assert calc.calls == [1, 0] and calc.changed == [1, 0]
    assert calc.next_token(0, text(tok, rows[0]), chosen=5) == 5  # call finished: nothing more is forced


def test_calculator_counts_no_change_when_the_model_agrees(tiny_tokenizer):
    tok = tiny_tokenizer
    calc = Calculator(tok, batch_size=1)
    row = ids(tok, "<<48/2=")
    for want in ids(tok, "24>>"):
        row.append(calc.next_token(0, text(tok, row), chosen=want))
    assert (calc.calls, calc.changed) == ([1], [0])


def scripted_model(model_dir, scripts: list[list[int]]):
    """The tiny model made to write `scripts[row]` token by token (every other token at -1e4, so sampling agrees)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    original, step = model.forward, {"n": 0}

    def scripted(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[:, -1, :] = -1e4
        for row, script in enumerate(scripts[: out.logits.shape[0]]):
            out.logits[row, -1, script[min(step["n"], len(script) - 1)]] = 0.0
        step["n"] += 1
        return out

    model.forward = scripted
    return model


def test_calculator_inside_generate(tiny_model_dir, tiny_tokenizer):
    """A scripted model writes `<<12*5=` then `99`: the calculator forces `60>>` in row 0; row 1 never calls it."""
    from gsmtune.config import load_config
    from gsmtune.generation import StopRules, generate

    tok = tiny_tokenizer
    scripts = [ids(tok, " <<12*5=") + ids(tok, "99 apples"), ids(tok, " 60 apples and more")]
    model = scripted_model(tiny_model_dir, scripts)
    gen = load_config(None, ["generation.max_new_tokens=12", "generation.calculator=true"]).generation
    prompts = [[tok.bos_token_id, *ids(tok, f"Question: {x}\nAnswer:")] for x in "xy"]  # distinct: one prefill row each
    first, second = generate(model, tok, prompts, gen, StopRules())
    assert first.text.startswith(" <<12*5=60>>") and (first.calculator_calls, first.calculator_changed) == (1, 1)
    assert second.text.startswith(" 60 apples") and second.calculator_calls == 0


def test_self_consistency_samples_use_the_calculator(tiny_model_dir, tiny_tokenizer):
    """The sampled completions of self-consistency go through the calculator too, not only the greedy one."""
    from types import SimpleNamespace

    from gsmtune.config import load_config
    from gsmtune.evaluate import sample_completions
    from gsmtune.generation import StopRules

    tok = tiny_tokenizer
    script = ids(tok, " <<12*5=") + ids(tok, "99 apples")
    model = scripted_model(tiny_model_dir, [script] * 2)  # one prompt x k=2 samples: two rows
    cfg = load_config(None, ["generation.max_new_tokens=12", "generation.calculator=true", "generation.num_samples=2",
                             "generation.batch_size=2"])
    lm = SimpleNamespace(model=model, tokenizer=tok)
    [samples] = sample_completions(lm, [[tok.bos_token_id, *ids(tok, "Question: x\nAnswer:")]], cfg, StopRules(), [0])
    assert all(s.text.startswith(" <<12*5=60>>") and (s.calculator_calls, s.calculator_changed) == (1, 1) for s in samples)
