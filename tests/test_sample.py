"""Text from a trained language model: distnn.models.sampling.generate against a
hand-written decoding loop, and ``python -m distnn.tools.sample`` on what distnn.train's
--save wrote (its metadata names the model), with bad input refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from distnn.errors import EXIT_USAGE
from distnn.models.gpt import build
from distnn.models.sampling import generate
from distnn.resilience.outputs import save_weights
from distnn.tools.sample import main as sample
from distnn.train import main as train
from tests.conftest import LAUNCH_VARS
from tests.user_models import bag_of_tokens, logits_in_a_dict

CONTEXT = 8


def tiny_gpt(vocab: int = 256, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(d_in=CONTEXT, d_out=vocab, d_model=16, n_layers=1, n_heads=2).eval()


def greedy_by_hand(model, ids: list[int], new_tokens: int) -> list[int]:
    """The likeliest next token, the whole window recomputed each time, the first tokens
    dropped once the window is longer than the context."""
    ids = list(ids)
    for _ in range(new_tokens):
        window = torch.tensor([ids[-CONTEXT:]])
        with torch.no_grad():
            scores = model(window)[0, -1]
        ids.append(int(torch.argmax(scores)))
    return ids


def test_greedy_decoding_is_the_likeliest_token_each_time_past_the_context():
    model = tiny_gpt()
    prompt = [104, 105, 32]  # b"hi "
    out = generate(model, torch.tensor([prompt]), new_tokens=12, context=CONTEXT,
                   temperature=0)
    assert out.shape == (1, 15)  # 15 > CONTEXT: the window slid
    assert out[0].tolist() == greedy_by_hand(model, prompt, 12)
    # the one likeliest token among k=1 is the greedy choice, whatever the temperature
    top1 = generate(model, torch.tensor([prompt]), new_tokens=12, context=CONTEXT,
                    temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1, out)


def test_draws_are_repeatable_for_a_seed_and_stay_among_the_top_k():
    model = tiny_gpt()
    prompt = torch.tensor([[1, 2, 3]])

    def draw(seed, **kwargs):
        return generate(model, prompt, new_tokens=20, context=CONTEXT,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    out = draw(3, top_k=3, temperature=1.5)[0].tolist()
    for position in range(3, len(out)):
        with torch.no_grad():
            scores = model(torch.tensor([out[max(0, position - CONTEXT):position]]))[0, -1]
        assert out[position] in scores.topk(3).indices.tolist(), position


def test_outputs_the_loss_reads_are_read_and_a_tiny_temperature_is_greedy():
    model = tiny_gpt()
    prompt = torch.tensor([[7, 8, 9]])
    greedy = generate(model, prompt, new_tokens=10, context=CONTEXT, temperature=0)
    in_a_dict = logits_in_a_dict(CONTEXT, 256, d_model=16, n_layers=1, n_heads=2)
    in_a_dict.gpt.load_state_dict(model.state_dict())
    assert torch.equal(generate(in_a_dict, prompt, new_tokens=10, context=CONTEXT,
                                temperature=0), greedy)
    # scores / 1e-40 would overflow to inf - inf = nan; the best score is taken out first
    assert torch.equal(generate(model, prompt, new_tokens=10, context=CONTEXT,
                                temperature=1e-40), greedy)


def test_bad_arguments_are_refused():
    for kwargs in (dict(top_k=0), dict(temperature=float("nan")), dict(temperature=-1.0),
                   dict(temperature=float("inf"))):
        with pytest.raises(ValueError, match="allowed: new_tokens >= 0"):
            generate(tiny_gpt(), torch.tensor([[1]]), new_tokens=1, context=CONTEXT, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte GPT distnn.train trained for 3 steps and --saved."""
    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(folder)
        for name in LAUNCH_VARS:
            monkeypatch.delenv(name, raising=False)
        _train()
    return folder / "lm.safetensors"


def _train() -> None:
    text = b"the ranks sum their gradients and every replica stays the same. " * 8
    ids = torch.tensor(list(text[:5 * (CONTEXT + 1)])).view(5, CONTEXT + 1)
    save_file({"x": ids[:, :-1].to(torch.uint8).contiguous(),
               "y": ids[:, 1:].to(torch.uint8).contiguous()}, "tokens.safetensors")
    args = json.dumps({"d_model": 16, "n_layers": 1, "n_heads": 2})
    assert train(["--data", "tokens.safetensors", "--model", "distnn.models.gpt:build",
                  "--model-args", args, "--d-out", "256", "--loss", "cross-entropy",
                  "--steps", "3", "--quiet", "--save", "lm.safetensors",
                  "--checkpoint-dir", "ck"]) == 0


def test_the_tool_continues_a_prompt_with_what_save_wrote(trained, capfdbinary):
    assert sample([str(trained), "--prompt", "the ranks", "--tokens", "30", "--seed",
                   "4"]) == 0
    first = capfdbinary.readouterr().out
    assert first.startswith(b"the ranks") and len(first) == len("the ranks") + 30 + 1
    assert sample([str(trained), "--prompt", "the ranks", "--tokens", "30", "--seed",
                   "4"]) == 0
    assert capfdbinary.readouterr().out == first  # a seed draws the same bytes
    # greedy, through the weights as trained, and the window past --context 8
    assert sample([str(trained), "--prompt", "the ranks", "--tokens", "12",
                   "--temperature", "0"]) == 0
    model = build(d_in=CONTEXT, d_out=256, d_model=16, n_layers=1, n_heads=2)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(trained))
    want = bytes(greedy_by_hand(model.eval(), list(b"the ranks"), 12)) + b"\n"
    assert capfdbinary.readouterr().out == want
    # the final checkpoint holds the same weights, and says which model too
    assert sample([str(trained.parent / "ck" / "step-3"), "--prompt", "the ranks",
                   "--tokens", "12", "--temperature", "0"]) == 0
    assert capfdbinary.readouterr().out == want


def one_error(capfd) -> str:
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distnn: error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capfd):
    cases = [
        ([str(tmp_path / "none.safetensors")], "cannot read "),
        ([str(tmp_path)], f"{tmp_path} holds no weights.safetensors (a sharded checkpoint"),
        ([str(trained), "--tokens", "-1"], "--tokens -1; allowed: 0 or more"),
        ([str(trained), "--top-k", "0"], "--top-k 0; allowed: 1 or more"),
        ([str(trained), "--temperature", "-1"], "--temperature -1; allowed: 0"),
        ([str(trained), "--temperature", "nan"], "--temperature nan; allowed: 0"),
        ([str(trained), "--seed", "-1"], "--seed -1; allowed: 0 to 2**63 - 1"),
        ([str(trained), "--seed", str(2**64)], "allowed: 0 to 2**63 - 1"),
        ([str(trained), "--prompt", ""], "--prompt is empty"),
        ([str(trained), "--bogus"], "unrecognized arguments: --bogus; see python -m"),
    ]
    (tmp_path / "text.safetensors").write_text("not tensors")
    cases.append(([str(tmp_path / "text.safetensors")], "is not a safetensors file"))
    # weights without distnn's metadata: distnn.fit's model, or another program's file
    save_file(tiny_gpt().state_dict(), tmp_path / "bare.safetensors")
    cases.append(([str(tmp_path / "bare.safetensors")], "does not say which model it holds"))
    # the MLP, and a model of token ids whose output is one score vector a row
    recipe = {"distnn.model": "", "distnn.model_args": "{}", "distnn.d_in": "8",
              "distnn.d_out": "10", "distnn.hidden": "[4]"}
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 10))
    save_weights(mlp, str(tmp_path / "mlp.safetensors"), recipe)
    cases.append(([str(tmp_path / "mlp.safetensors")], "holds distnn's MLP (no --model)"))
    bag = dict(recipe, **{"distnn.model": "tests.user_models:bag_of_tokens",
                          "distnn.d_out": "256"})
    save_weights(bag_of_tokens(8, 256), str(tmp_path / "bag.safetensors"), bag)
    cases.append(([str(tmp_path / "bag.safetensors"), "--prompt", "ab"],
                  "maps token ids [1, 2] to [1, 256], not to next-token scores [1, 2, 256]"))
    # a vocabulary of 100: the byte of "é" is beyond it
    gpt = dict(recipe, **{"distnn.model": "distnn.models.gpt:build", "distnn.d_out": "100",
                          "distnn.model_args": '{"d_model": 16, "n_layers": 1, "n_heads": 2}'})
    save_weights(tiny_gpt(vocab=100), str(tmp_path / "gpt100.safetensors"), gpt)
    cases.append(([str(tmp_path / "gpt100.safetensors"), "--prompt", "é"],
                  "the byte 195, and the model knows bytes 0 to 99 only"))
    save_weights(tiny_gpt(vocab=100), str(tmp_path / "other.safetensors"),
                 dict(gpt, **{"distnn.d_out": "90"}))  # metadata that the weights do not fit
    cases.append(([str(tmp_path / "other.safetensors")], "its weights do not fit the model "
                  "its metadata names (size mismatch for tokens.weight"))
    save_weights(tiny_gpt(vocab=100), str(tmp_path / "gone.safetensors"),
                 dict(gpt, **{"distnn.model": "no_such_module:build"}))  # not importable here
    cases.append(([str(tmp_path / "gone.safetensors")], "gone.safetensors was trained with "
                  "--model no_such_module:build, which cannot be built here: --model: cannot "
                  "import 'no_such_module'"))
    save_weights(tiny_gpt(vocab=100), str(tmp_path / "damaged.safetensors"),
                 dict(gpt, **{"distnn.d_in": "eight"}))
    cases.append(([str(tmp_path / "damaged.safetensors")], "its distnn metadata is damaged"))
    for argv, said in cases:
        assert sample(argv) == EXIT_USAGE, argv
        assert said in one_error(capfd), argv
