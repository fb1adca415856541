"""The tuner library: dataset validation/cleaning/splitting, and a real LoRA run that makes a
tiny random Llama memorise question -> answer pairs, cancels cleanly and resumes."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.drivers.default_model import make_tiny_model
from llmos.services.tuner import DatasetError, Record, TrainError, load_jsonl, train_lora
from llmos.services.tuner.train import IGNORE, encode

transformers.logging.set_verbosity_error()

PAIRS = [("What is the capital of France?", " Paris"),
         ("What color is the sky?", " blue"),
         ("How many legs has a dog?", " four"),
         ("Who wrote Hamlet?", " Shakespeare"),
         ("What is two plus two?", " 4"),
         ("What do cows drink?", " water"),
         ("Where is the kernel?", " in memory"),
         ("Say hello.", " hello world")]
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARAMS = dict(rank=8, alpha=16, lr=1e-2, epochs=40, batch_size=8, seed=0,
              target_modules=ALL_PROJECTIONS)


def jsonl(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def qa_dataset():
    return load_jsonl(jsonl(*({"prompt": p, "completion": c} for p, c in PAIRS)))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    # The fixture's default init (std 0.02) gives an LM head whose logits span about +-1, so a
    # frozen head caps how low any adapter can push the loss (~5.4 nats). A wider init (as the
    # fixture already uses for gpt2) lets a LoRA on the body make confident predictions.
    return make_tiny_model("llama", tmp_path_factory.mktemp("tuner") / "llama",
                           initializer_range=0.2)


@pytest.fixture(scope="module")
def trained(model_path, tmp_path_factory):
    """One full training run, shared by the tests that inspect its result."""
    ds = qa_dataset()
    out = tmp_path_factory.mktemp("runs") / "qa"
    progress = []
    # Validation set = the training set: the test is about memorisation, not generalisation.
    result = train_lora(model_path, ds.records, ds.records, PARAMS, out, on_progress=progress.append)
    return result, out, progress


def greedy(model, tokenizer, prompt: str, num_new: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:])


# ---- dataset --------------------------------------------------------------------------------

def test_malformed_json_names_the_line():
    text = jsonl({"prompt": "a", "completion": "b"}, "", '{"prompt": "a", "completion": ')
    with pytest.raises(DatasetError) as e:
        load_jsonl(text)
    assert e.value.errno == "EINVAL" and e.value.message.startswith("line 3: malformed JSON")


@pytest.mark.parametrize("bad, why", [
    ([1, 2], "expected a JSON object"),
    ({"prompt": "a"}, "missing 'completion'"),
    ({"prompt": 3, "completion": "b"}, "'prompt' must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "missing 'content'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"text": "hello"}, "expected 'messages' or 'prompt'"),
])
def test_invalid_record_names_the_line(bad, why):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DatasetError) as e:
        load_jsonl(jsonl(good, good, bad, good))
    assert e.value.message.startswith("line 3: ") and why in e.value.message


def test_cleaning_drops_empty_long_and_duplicates():
    ds = load_jsonl(jsonl(
        {"prompt": "q1", "completion": "a1"},
        {"prompt": "q1", "completion": "a1"},                  # duplicate
        {"prompt": "q2", "completion": "   "},                 # empty
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"prompt": "q3", "completion": "x" * 100},             # too long
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ), max_chars=50)
    assert ds.report == dict(read=7, dropped_empty=2, dropped_long=1, duplicates=2, kept=2,
                             train=0, val=0)
    assert [r.is_chat for r in ds] == [False, True]


def test_split_is_seeded_deterministic_and_keeps_one_val():
    ds = load_jsonl(jsonl(*({"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20))))
    train, val = ds.split(0.25, seed=7)
    again_train, again_val = ds.split(0.25, seed=7)
    assert (train.records, val.records) == (again_train.records, again_val.records)
    assert len(val) == 5 and len(train) == 15
    assert set(train.records) | set(val.records) == set(ds.records)
    assert ds.split(0.25, seed=8)[1].records != val.records
    assert ds.report["train"] == 15 and ds.report["val"] == 5
    two = load_jsonl(jsonl({"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}))
    assert [len(half) for half in two.split(0.01, seed=0)] == [1, 1]


def test_chat_loss_is_only_on_the_last_assistant_message(model_path):
    tok = AutoTokenizer.from_pretrained(model_path)
    record = Record(messages=(("user", "hi"), ("assistant", "hello"), ("user", "bye"),
                              ("assistant", "see you")))
    ex = encode(tok, record, 1024)
    learned = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert learned.startswith("see you") and "hello" not in learned
    qa = encode(tok, Record(prompt="Q?", completion=" A"), 1024)
    assert qa.input_ids[-1] == tok.eos_token_id and qa.labels[0] == IGNORE


# ---- training -------------------------------------------------------------------------------

def test_rank_must_be_positive(model_path, tmp_path):
    with pytest.raises(TrainError) as e:
        train_lora(model_path, qa_dataset().records, [], {**PARAMS, "rank": 0}, tmp_path / "x")
    assert e.value.errno == "EINVAL" and not (tmp_path / "x").exists()


def test_lora_run_cuts_validation_loss_five_fold(trained):
    result, out, progress = trained
    assert result["state"] == "done" and result["step"] == PARAMS["epochs"]
    assert result["final_eval_loss"] * 5 <= result["initial_eval_loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == result["step"]
    assert metrics["final_eval_loss"] == result["final_eval_loss"]
    assert [p["step"] for p in progress] == list(range(1, PARAMS["epochs"] + 1))
    assert all(p["tokens_per_s"] > 0 for p in progress)
    assert not out.with_name(out.name + ".ckpt").exists()


def test_saved_adapter_reproduces_every_answer_and_base_does_not(trained, model_path):
    _, out, _ = trained
    tok = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    lengths = [len(tok(answer, add_special_tokens=False)["input_ids"]) for _, answer in PAIRS]
    base_outputs = [greedy(base, tok, q, n) for (q, _), n in zip(PAIRS, lengths)]
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    tuned_outputs = [greedy(tuned, tok, q, n) for (q, _), n in zip(PAIRS, lengths)]
    assert tuned_outputs == [answer for _, answer in PAIRS]
    assert all(b != answer for b, (_, answer) in zip(base_outputs, PAIRS))


def test_cancel_leaves_no_output_dir(model_path, tmp_path):
    out = tmp_path / "cancelled"
    steps = []
    result = train_lora(model_path, qa_dataset().records, [], PARAMS, out,
                        on_progress=lambda p: steps.append(p["step"]),
                        should_stop=lambda: len(steps) >= 3)
    assert result["state"] == "cancelled" and result["step"] == 3
    assert not out.exists() and result["out_dir"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cancelled.ckpt"]


def test_resume_continues_from_the_last_checkpoint(model_path, tmp_path):
    out = tmp_path / "resumed"
    params = {**PARAMS, "epochs": 12, "checkpoint_every": 4}

    def crash(progress):                # a hard failure after step 6: the step-4 checkpoint stays
        if progress["step"] == 6:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train_lora(model_path, qa_dataset().records, [], params, out, on_progress=crash)
    assert not out.exists() and (tmp_path / "resumed.ckpt").exists()
    steps = []
    result = train_lora(model_path, qa_dataset().records, [], params, out,
                        on_progress=lambda p: steps.append(p["step"]))
    assert result["state"] == "done" and result["resumed_from_step"] == 4
    assert steps == list(range(5, 13)) and result["step"] == 12
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
