"""A process's text, decoded token by token: incremental (a window of a few tokens per new one)
and exactly what decoding the whole turn gives, for byte-level and SentencePiece-like tokenizers
(made offline), with stop strings cut and partial characters held back."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmos.drivers import text
from llmos.kernel.procio import ProcIO

CORPUS = ["Hello world, this is a test of an offline tokenizer. Ünïcödé tëxt and 日本語 too!",
          "Language models read text as tokens; the kernel streams them to readers."] * 20


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    if kind == "metaspace":                # SentencePiece-like: leading spaces, byte fallback
        tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        special = ["<unk>", "<s>"] + [f"<0x{i:02X}>" for i in range(256)]
        tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    else:                                  # GPT-2-like byte-level BPE
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


def stream(tok, ids, stop=()):
    io = ProcIO(decode=lambda x: text.decode(tok, x), stop=tuple(stop))
    chunks, ended = [], False
    for t in ids:
        ended = io.append(t)
        chunk = io.pending_chunk(final=ended)
        if chunk:
            chunks.append(chunk["text"])
        if ended:
            break
    if not ended:
        chunks.append(io.pending_chunk(final=True)["text"])
    return io, "".join(chunks)


@pytest.mark.parametrize("kind", ["metaspace", "bytelevel"])
def test_incremental_text_equals_decoding_the_whole_turn(kind):
    tok = make_tokenizer(kind)
    rng = random.Random(7)
    for _ in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
        io, streamed = stream(tok, ids)
        assert io.text == streamed == text.decode(tok, ids)


def test_a_long_turn_decodes_only_a_window_per_token():
    tok = make_tokenizer("bytelevel")
    seen = []
    io = ProcIO(decode=lambda x: (seen.append(len(x)), text.decode(tok, x))[1])
    ids = tok.encode(" ".join(CORPUS))[:600]
    for t in ids:
        io.append(t)
    assert io.text == text.decode(tok, ids)
    assert sum(seen) < 20 * len(ids)        # decoding the whole turn each time: ~len(ids)**2 / 2


def test_stop_strings_cut_the_text_and_streaming_never_takes_text_back():
    tok = make_tokenizer("bytelevel")
    ids = tok.encode("the kernel streams them to readers. Hello world")
    io, streamed = stream(tok, ids, stop=["to readers"])
    assert io.text == streamed == "the kernel streams them "
