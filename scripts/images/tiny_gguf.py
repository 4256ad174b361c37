"""Writes a tiny random-weight llama-family model as GGUF, with a real vocabulary.

The vocabulary (tokens, scores, types, special ids) is copied from one of the
vocabulary-only GGUF files llama.cpp ships under models/ (ggml-vocab-llama-spm.gguf
by default: SentencePiece, 32000 tokens). The weights are random normal numbers
from numpy's PCG64 seeded with --seed, so the same arguments give the same bytes.
llama-server loads the result and generates (nonsense) tokens with it.

Run through scripts/images/tiny-gguf, which puts the sdist's gguf-py on the path:
    tiny-gguf OUT.gguf [--seed N] [--type f16|q8_0] [--vocab NAME]
              [--embd N --layers N --ff N]   (a bigger model, e.g. ~1 GB for the cold-start bench)
"""

import argparse
import os
import sys

import numpy as np
import gguf

# Shape of the model: a few MB, almost all of it the token embedding.
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
N_FF = 128
N_CTX = 2048

# A plain llama-2-style template, so the chat endpoint uses the model's own.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)


def copy_vocab(writer: gguf.GGUFWriter, vocab_path: str) -> int:
    """Copies the tokenizer keys of a vocabulary-only GGUF; returns the vocabulary size."""
    r = gguf.GGUFReader(vocab_path)
    f = r.fields
    model = f["tokenizer.ggml.model"].contents()
    tokens = f["tokenizer.ggml.tokens"].contents()
    writer.add_tokenizer_model(model)
    if "tokenizer.ggml.pre" in f:
        writer.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    writer.add_token_list(tokens)
    if "tokenizer.ggml.scores" in f:
        writer.add_token_scores(f["tokenizer.ggml.scores"].contents())
    writer.add_token_types(f["tokenizer.ggml.token_type"].contents())
    if "tokenizer.ggml.merges" in f:
        writer.add_token_merges(f["tokenizer.ggml.merges"].contents())
    for key, add in [
        ("tokenizer.ggml.bos_token_id", writer.add_bos_token_id),
        ("tokenizer.ggml.eos_token_id", writer.add_eos_token_id),
        ("tokenizer.ggml.unknown_token_id", writer.add_unk_token_id),
        ("tokenizer.ggml.add_bos_token", writer.add_add_bos_token),
        ("tokenizer.ggml.add_eos_token", writer.add_add_eos_token),
    ]:
        if key in f:
            add(f[key].contents())
    return len(tokens)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--type", choices=["f16", "q8_0"], default="f16")
    p.add_argument("--vocab", default="llama-spm", help="ggml-vocab-<NAME>.gguf from the tree's models/")
    p.add_argument("--tree", default=os.environ.get("LLAMA_CPP_TREE"), help="the llama.cpp tree")
    p.add_argument("--embd", type=int, default=N_EMBD, help="embedding length (a multiple of 64)")
    p.add_argument("--layers", type=int, default=N_LAYER, help="blocks")
    p.add_argument("--ff", type=int, default=N_FF, help="feed-forward length")
    a = p.parse_args()
    if a.embd % 64:
        p.error("--embd must be a multiple of 64")
    n_embd, n_layer, n_ff = a.embd, a.layers, a.ff
    if not a.tree:
        p.error("--tree or LLAMA_CPP_TREE is required")

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[a.type]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[a.type]
    tmp = a.out + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"aimodel tiny llama (random, seed {a.seed})")
    w.add_context_length(N_CTX)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(n_embd // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(ftype)
    n_vocab = copy_vocab(w, os.path.join(a.tree, "models", f"ggml-vocab-{a.vocab}.gguf"))
    w.add_vocab_size(n_vocab)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.Generator(np.random.PCG64(a.seed))

    def matrix(name: str, rows: int, cols: int) -> None:
        # numpy's (rows, cols) is ggml's ne = [cols, rows]: rows outputs of cols inputs.
        data = rng.normal(0.0, 0.5, size=(rows, cols)).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(n_embd, dtype=np.float32))

    n_embd_kv = n_embd // N_HEAD * N_HEAD_KV
    matrix("token_embd.weight", n_vocab, n_embd)
    norm("output_norm.weight")  # no output.weight: llama.cpp ties it to token_embd
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        matrix(f"blk.{i}.attn_k.weight", n_embd_kv, n_embd)
        matrix(f"blk.{i}.attn_v.weight", n_embd_kv, n_embd)
        matrix(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
