"""A single-file Llama that reads a Hugging Face checkpoint directory, with LongHeads attention.

The model is the Llama architecture (RMSNorm, RoPE in the Hugging Face rotate-half layout,
grouped-query attention, SwiGLU MLP) written so that its module names are the checkpoint's tensor
names: loading is reading `config.json`, then the safetensors file(s) straight into the modules.
No transformers, no pickle.

Attention is pluggable per model: "full" is ordinary causal attention (PyTorch SDPA) over the
whole context; "longheads" is LongHeads (longheads.py, run by tiled.py's fast path), which lets
the model read past its trained length.
Either way every layer owns a cache, and a prompt and a generated token run the same code.

Sections: config, caches for full attention, the modules, loading, generation.
"""
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from longheads import (CHUNK_SIZE, apply_rope, check_config, default_num_chunks, need,
                       rope_cos_sin, rope_inv_freq)
from tiled import LongHeadsCache, causal_attention, check_grad_call, records_grad

ROPE_TYPES = ("default", "linear", "dynamic")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
ATTENTIONS = ("full", "longheads")
PREFILL_PIECE = 2048  # tokens per call when a prompt goes into caches (Llama.prefill)


# ----------------------------------------------------------------------------- config

@dataclass
class LlamaConfig:
    """Defaults are Llama-2-7B, the model of the LongHeads paper."""
    vocab_size: int = 32000
    hidden_size: int = 4096  # C, the width of the residual stream
    intermediate_size: int = 11008  # width of the MLP
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H query heads
    num_key_value_heads: int = 32  # Hkv key/value heads; fewer than H is grouped-query attention
    # D; hidden_size // num_attention_heads unless the checkpoint says otherwise
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # RoPE base
    rope_type: str = "default"  # "default", "linear" (positions / factor) or "dynamic" (NTK base)
    rope_factor: float = 1.0  # the scaling factor of "linear" and "dynamic"
    max_position_embeddings: int = 4096  # L, the context length the model was trained on
    tie_word_embeddings: bool = False  # the output layer reuses the embedding matrix
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    torch_dtype: str | None = None  # the dtype the checkpoint declares

    @classmethod
    def from_dict(cls, d):
        """Read a Hugging Face config.json dict; a model we cannot represent is a ValueError."""
        for key, ok in [("model_type", d.get("model_type", "llama") == "llama"),
                        ("hidden_act", d.get("hidden_act", "silu") == "silu"),
                        ("attention_bias", not d.get("attention_bias", False)),
                        ("mlp_bias", not d.get("mlp_bias", False))]:
            if not ok:
                raise ValueError(f"config.json: {key}={d.get(key)!r} is not supported (a Llama "
                                 f"with silu and no biases is)")
        for key in REQUIRED:
            if not isinstance(d.get(key), int) or d[key] < 1:
                raise ValueError(f"config.json: {key} must be a positive integer, "
                                 f"got {d.get(key)!r}")
        known = {f.name for f in fields(cls)} - {"rope_type", "rope_factor", "rope_theta"}
        args = {k: v for k, v in d.items() if k in known and v is not None}
        args.setdefault("num_key_value_heads", d["num_attention_heads"])
        args.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        args["torch_dtype"] = d.get("torch_dtype") or d.get("dtype")
        return cls(**args, **rope_settings(d))

    def inv_freq(self, context):
        """RoPE inverse frequencies (D/2,) for a context of `context` positions."""
        theta, D = self.rope_theta, self.head_dim
        if self.rope_type == "dynamic":  # NTK: raise the base once the context outgrows L
            L, f = self.max_position_embeddings, self.rope_factor
            theta *= (f * max(context, L) / L - (f - 1)) ** (D / (D - 2))
        inv_freq = rope_inv_freq(D, theta)
        return inv_freq / self.rope_factor if self.rope_type == "linear" else inv_freq


def rope_settings(d):
    """RoPE base and scaling from either spelling: rope_theta + rope_scaling (classic), or
    rope_parameters {rope_type, rope_theta, factor} (transformers >= 5)."""
    p = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: rope type {rope_type!r} (rope_scaling / rope_parameters) "
                         f"is not supported; supported: {', '.join(ROPE_TYPES)}")
    factor = float(p.get("factor", 1.0)) if rope_type != "default" else 1.0
    theta = float(p.get("rope_theta", d.get("rope_theta", 10000.0)))
    return {"rope_theta": theta, "rope_type": rope_type, "rope_factor": factor}


# ----------------------------------------------------------------------------- full attention cache

class KVCache(nn.Module):
    """Keys (rotated at their true positions) and values for ordinary causal attention."""

    def __init__(self, batch, num_heads, num_kv_heads, max_len, head_dim, *, inv_freq, dtype,
                 device):
        super().__init__()
        self.max_len, self.length = max_len, 0
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("k", torch.zeros(batch, num_kv_heads, max_len, head_dim, dtype=dtype,
                                              device=device), persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)

    def forward(self, q, k, v):
        """q: (B, H, T, D), k and v: (B, Hkv, T, D) before RoPE -> (B, H, T, D)."""
        start, T = self.length, q.shape[2]
        end = start + T
        check_grad_call(start, q, k, v)
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; "
                             f"it has {start} and got {T} more")
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, end, device=q.device))  # (T, D)
        self.k[:, :, start:end] = apply_rope(k, cos, sin)
        self.v[:, :, start:end] = v
        self.length = end
        return causal_attention(apply_rope(q, cos, sin), self.k[:, :, :end], self.v[:, :, :end])


# ----------------------------------------------------------------------------- the modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # float32: a sum of squares of a wide vector loses digits in bfloat16
        norm = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * norm.to(x.dtype)


class Attention(nn.Module):
    """The projections around attention, and no attention itself: q, k, v go to the layer's cache
    (KVCache for full attention, tiled.LongHeadsCache for LongHeads), which applies RoPE, stores
    the keys and values, and returns the attention output. So one model runs either kind."""

    def __init__(self, cfg):
        super().__init__()
        self.H, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.H * self.D, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.Hkv * self.D, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.Hkv * self.D, bias=False)
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=False)

    def forward(self, x, cache):
        B, T, C = x.shape  # batch, tokens, hidden size
        y = cache(*self.qkv(x))  # (B, H, T, D): RoPE, storing and attending are the cache's job
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))  # (B, T, C)

    def qkv(self, x):
        """x (B, T, C) -> q (B, H, T, D), k and v (B, Hkv, T, D), before RoPE."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # (B, Hkv, T, D)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cache):
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """Everything but the output layer; named "model" in the checkpoint."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """input_ids (B, T): equal-length prompts only (no attention mask, no padding)."""

    def __init__(self, cfg, *, attention="full", chunk_size=CHUNK_SIZE, num_chunks=None,
                 offload=False):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        given = num_chunks is not None  # else the paper's rule, which a tiny model may not fit
        if not given:
            num_chunks = default_num_chunks(cfg.max_position_embeddings, chunk_size)
        check_config(cfg.num_attention_heads, cfg.num_key_value_heads, chunk_size, num_chunks)
        budget = chunk_size * num_chunks  # the most positions a query sees
        if (given or attention == "longheads") and budget > cfg.max_position_embeddings:
            raise ValueError(f"chunk_size x num_chunks = {budget} exceeds the model's trained "
                             f"length {cfg.max_position_embeddings}: LongHeads would show it "
                             f"distances it never saw; use fewer or smaller chunks")
        self.config, self.attention = cfg, attention
        # offload: LongHeads' keys and values in CPU memory
        self.chunk_size, self.offload = chunk_size, offload
        # num_chunks=None is the paper's rule: a budget of the trained length, so that nothing
        # changes for contexts the model was trained on
        self.num_chunks = num_chunks
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_caches(self, batch, max_len):
        """One empty cache per layer for `batch` sequences of up to max_len tokens."""
        need(min(batch, max_len) >= 1, f"batch and max_len must be >= 1, got {batch}, {max_len}")
        cfg, dtype, device = self.config, self.lm_head.weight.dtype, self.lm_head.weight.device
        shape = (batch, cfg.num_attention_heads, cfg.num_key_value_heads, max_len, cfg.head_dim)
        if self.attention == "full":
            make = lambda: KVCache(*shape, inv_freq=cfg.inv_freq(max_len), dtype=dtype,
                                   device=device)
        else:  # LongHeads never places a token further than chunk_size * num_chunks away
            seen = min(max_len, self.chunk_size * self.num_chunks)
            make = lambda: LongHeadsCache(*shape, chunk_size=self.chunk_size,
                                          num_chunks=self.num_chunks, rope=cfg.inv_freq(seen),
                                          dtype=dtype, device=device, offload=self.offload)
        return nn.ModuleList([make() for _ in range(cfg.num_hidden_layers)])

    def hidden(self, input_ids, caches):
        """input_ids (B, T) after what the caches hold -> final hidden states (B, T, C)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cache)
        return self.model.norm(x)

    def forward(self, input_ids, caches=None):
        """input_ids (B, T) -> logits (B, T, vocab). Without caches: a fresh sequence."""
        check_ids(input_ids, self.config.vocab_size)
        if caches is None:
            caches = self.new_caches(input_ids.shape[0], input_ids.shape[1])
        return self.lm_head(self.hidden(input_ids, caches))

    def prefill(self, input_ids, caches, piece=PREFILL_PIECE):
        """input_ids (B, T) into the caches, piece tokens at a time -> the last position's final
        hidden state (B, C). The same computation as one call (a token sees only earlier ones,
        which the caches hold), in less working memory: a 7B model's 128k-token prompt needs
        ~12 GB of it in one call, ~2.4 GB in pieces of 8192 (lab.bench --estimate-memory); on a
        CPU a piece's activations also stay in its caches (15-20 % faster at 16k)."""
        check_ids(input_ids, self.config.vocab_size)
        need(input_ids.shape[1] <= piece or not records_grad(*self.parameters()), f"prefill: "
             f"input_ids past one piece ({piece}) with autograd on: call it under torch.no_grad()")
        for s in range(0, input_ids.shape[1], piece):
            h = self.hidden(input_ids[:, s:s + piece], caches)  # (B, <= piece, C)
        return h[:, -1]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, caches=None,
                 eos_token_id=None):
        """Prefill the prompt once, then one token per step through the caches, until each row
        has made an end token: eos_token_id, one id or a list (None: config.json's; []: never).

        input_ids (B, T) -> (B, T + steps), 1 <= steps <= max_new_tokens: a row that ended
        repeats its end token until all rows have. temperature 0 is greedy decoding, else top-k
        sampling (top_k None: all tokens). Without caches, input_ids start a fresh sequence. With
        caches (new_caches), input_ids are the new tokens only, which continue what the caches
        hold; the caches then hold every token returned (the last one too), so a conversation
        goes on with the next new tokens alone.
        """
        check_ids(input_ids, self.config.vocab_size)
        need(isinstance(max_new_tokens, int) and max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        need(temperature >= 0, f"temperature must be >= 0 (0: greedy), got {temperature}")
        need(top_k is None or isinstance(top_k, int) and top_k >= 1,
             f"top_k must be an integer >= 1, or None (no limit), got {top_k!r}")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        # why type(): False (never stop) is an int too; a config without an end token never stops
        eos = torch.tensor([eos] if type(eos) is int else list(eos or []), dtype=torch.long,
                           device=input_ids.device)  # (E,)
        given = caches is not None
        if not given:
            caches = self.new_caches(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        tokens = input_ids
        ended = torch.zeros_like(input_ids[:, :1], dtype=torch.bool)  # (B, 1)
        h = self.prefill(input_ids, caches)  # (B, C): the prompt's last position, checked once
        for step in range(max_new_tokens):
            new = sample(self.lm_head(h), temperature, top_k)  # (B, 1)
            new = torch.where(ended, tokens[:, -1:], new)  # a row that ended repeats its end
            tokens = torch.cat([tokens, new], dim=1)
            ended |= torch.isin(new, eos)
            if ended.all() or step == max_new_tokens - 1:
                break
            # why hidden, not prefill: a sampled token needs no check, which reads ids back
            h = self.hidden(new, caches)[:, -1]  # (B, C)
        if given:
            # why: the caller's caches then hold every token returned, and the next call goes on
            # after the last of them, as one call on the whole history would
            self.hidden(new, caches)
        return tokens

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=None, attention="full",
                        chunk_size=CHUNK_SIZE, num_chunks=None, offload=False):
        """Load a Hugging Face Llama checkpoint directory (config.json + safetensors)."""
        check_device(device)
        path = Path(path)
        cfg = LlamaConfig.from_dict(read_json(path / "config.json"))
        files = checkpoint_files(path)
        with torch.device("meta"):  # no memory yet: the checkpoint's tensors become the weights
            model = cls(cfg, attention=attention, chunk_size=chunk_size, num_chunks=num_chunks,
                        offload=offload)
        shapes = tensor_shapes(files)
        check_tensors(model, shapes)
        dtype = to_dtype(dtype) if dtype is not None else None
        for file in files:
            with safe_open(file, framework="pt", device=str(device)) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(IGNORED)}
            tensors = {k: t if dtype is None else t.to(dtype) for k, t in tensors.items()
                       if not (k == "lm_head.weight" and tied(cfg, shapes))}
            model.load_state_dict(tensors, strict=False, assign=True)
        if tied(cfg, shapes):
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def check_ids(input_ids, vocab_size):
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids of shape (batch, tokens), got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}: for one sequence, "
                         f"pass ids[None]")
    need(input_ids.numel() > 0, f"input_ids {tuple(input_ids.shape)} hold no tokens: give some")
    low, high = (int(x) for x in input_ids.aminmax())  # why int: read back once, here
    need(0 <= low and high < vocab_size, f"input_ids must be token ids in [0, vocab_size = "
         f"{vocab_size}), got {low} ... {high}")


def sample(logits, temperature=0.0, top_k=None):
    """logits (B, vocab) -> next tokens (B, 1): greedy at temperature 0, else top-k sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), num_samples=1)


# ----------------------------------------------------------------------------- loading

# why: older conversions saved RoPE's frequencies beside the weights; we compute them instead
IGNORED = ("rotary_emb.inv_freq",)


def check_device(device):
    """A device the loader can read weights into, or one line that says what to do."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch has no CUDA device (a CPU build, or "
                         f"no GPU); load on 'cpu', or install a CUDA build of torch")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: weights are read into 'cpu' or 'cuda'; load on "
                         f"'cpu' and move the model with .to({str(device)!r})")


def read_json(file):
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: give a Hugging Face checkpoint directory")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None


def checkpoint_files(path):
    """model.safetensors, or the shards that model.safetensors.index.json lists."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        return [path / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            f"(only safetensors checkpoints are read)")


def tensor_shapes(files):
    """{name: shape} of every tensor in the files, read from their headers only."""
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
    return shapes


def check_tensors(model, shapes):
    """Every tensor the model needs is there with its shape, and nothing else is."""
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    if tied(model.config, shapes):  # the output layer is the embedding; a stored copy is ignored
        del expected["lm_head.weight"]
        shapes = {k: s for k, s in shapes.items() if k != "lm_head.weight"}
    for key in sorted(expected):
        if key not in shapes:
            raise ValueError(f"checkpoint: tensor {key} is missing")
        if shapes[key] != expected[key]:
            raise ValueError(f"checkpoint: tensor {key} has shape {shapes[key]}, "
                             f"config.json implies {expected[key]}")
    for key in sorted(shapes):
        if key not in expected and not key.endswith(IGNORED):
            raise ValueError(f"checkpoint: tensor {key} is not part of a Llama this model can run")


def tied(cfg, shapes):
    """Whether the output layer reuses the embedding: the config says so, or it is not stored."""
    return cfg.tie_word_embeddings or "lm_head.weight" not in shapes


def to_dtype(dtype):
    """torch.float16 or "float16" / "bfloat16" / "float32" -> a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    return getattr(torch, dtype)
