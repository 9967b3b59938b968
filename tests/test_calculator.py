import pytest
import torch

from gsmtune.calculator import CalculatorProcessor, format_result, pending_result


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


def test_processor_forces_only_the_row_that_calls(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [tok.bos_token_id]
    rows = [prompt + ids(tok, " so <<(3+4)*2="), prompt + ids(tok, " so 3+4=")]
    width = max(len(r) for r in rows)
    rows = [[tok.pad_token_id] * (width - len(r)) + r for r in rows]  # left-padded like generate's input
    proc = CalculatorProcessor(tok, prompt_len=0, batch_size=2)  # scripted stream: decode everything
    vocab = len(tok)
    written, expected = [], ids(tok, "14>>")
    current = torch.tensor(rows)
    for _ in range(len(expected)):
        scores = torch.zeros(2, vocab)
        scores[:, 5] = 1.0  # the "model" would write token 5 everywhere
        out = proc(current, scores.clone())
        assert torch.isinf(out[0]).sum() == vocab - 1  # row 0 forced to one token
        assert torch.equal(out[1], scores[1])  # row 1 untouched
        token = int(out[0].argmax())
        written.append(token)
        current = torch.cat([current, torch.tensor([[token], [5]])], dim=1)
    assert written == expected
    assert proc.calls == [1, 0] and proc.changed == [1, 0]
    scores = torch.zeros(2, vocab)
    assert torch.equal(proc(current, scores.clone()), scores)  # call finished: nothing more is forced


def test_calculator_inside_generate(tiny_model_dir, tiny_tokenizer):
    """A scripted model writes `<<12*5=` then `99`: the calculator forces `60>>` in row 0; row 1 never calls it."""
    from transformers import AutoModelForCausalLM

    from gsmtune.config import load_config
    from gsmtune.generation import StopRules, generate

    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    scripts = [ids(tok, " <<12*5=") + ids(tok, "99 apples"), ids(tok, " 60 apples and more")]
    original, step = model.forward, {"n": 0}

    def scripted(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[:, -1, :] = -1e4
        for row, script in enumerate(scripts):
            out.logits[row, -1, script[min(step["n"], len(script) - 1)]] = 0.0
        step["n"] += 1
        return out

    model.forward = scripted
    gen = load_config(None, ["generation.max_new_tokens=12", "generation.calculator=true"]).generation
    first, second = generate(model, tok, [[tok.bos_token_id, *ids(tok, "Question: x\nAnswer:")]] * 2, gen, StopRules())
    assert first.text.startswith(" <<12*5=60>>") and (first.calculator_calls, first.calculator_changed) == (1, 1)
    assert second.text.startswith(" 60 apples") and second.calculator_calls == 0
