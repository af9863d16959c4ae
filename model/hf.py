"""Hugging Face adapter: load `GPT2LMHeadModel` / `LlamaForCausalLM` folders into a `GPT`, and save
a `GPT` as such a folder (config.json + model.safetensors + generation_config.json [+ tokenizer]).

Only safetensors checkpoints are read (one file or sharded with model.safetensors.index.json).
Loading builds the model on the meta device (no random init, no double allocation) and assigns
the converted tensors in one `load_state_dict(assign=True)`.

Weight layout notes:
- GPT-2 uses `Conv1D` whose weight is [in, out], the transpose of nn.Linear; its `c_attn` is the
  fused q|k|v projection, split here into q_proj, k_proj, v_proj.
- Llama q/k weights need no permutation: `GPT` uses the same rotate-half RoPE convention as HF.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import GPTConfig
from .gpt import GPT

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation used by GPT


# --------------------------------------------------------------------------------------------------
# Config conversion.


def _as_dict(hf_config) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ValueError(f"expected a dict or a transformers config, got {type(hf_config).__name__}")


def _model_type(cfg: dict) -> str:
    mt = cfg.get("model_type")
    if mt is None:
        archs = cfg.get("architectures") or []
        mt = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}.get(archs[0] if archs else "")
    if mt not in ("gpt2", "llama"):
        raise ValueError(f"unsupported Hugging Face architecture model_type={mt!r} "
                         f"(architectures={cfg.get('architectures')}); supported: gpt2, llama")
    return mt


def _rope_theta(cfg: dict) -> float:
    # transformers 5 stores rope settings in `rope_parameters`; 4.x in `rope_theta`/`rope_scaling`.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for p in (params, scaling):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"unsupported RoPE scaling rope_type={rope_type!r}; only plain RoPE is implemented")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def gpt_config_from_hf(hf_config, **overrides) -> GPTConfig:
    """A `GPTConfig` from a Hugging Face config (dict from config.json, or a transformers config).
    `overrides` replace fields afterwards (e.g. max_seq_len, dropout, kernels)."""
    cfg = _as_dict(hf_config)
    mt = _model_type(cfg)
    extra = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    if mt == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTS:
            raise ValueError(f"unsupported GPT-2 activation_function={act!r}; supported: {_GPT2_ACTS}")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("add_cross_attention"):
            raise ValueError("unsupported GPT-2 options: scale_attn_by_inverse_layer_idx / add_cross_attention")
        if cfg.get("scale_attn_weights") is False:
            raise ValueError("unsupported GPT-2 option scale_attn_weights=False")
        d = cfg["n_embd"]
        kw = dict(
            style="gpt2", vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
            d_model=d, d_ff=cfg.get("n_inner") or 4 * d, max_seq_len=cfg.get("n_positions", 1024),
            dropout=float(cfg.get("resid_pdrop", 0.0)), bias=True,
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            init_std=float(cfg.get("initializer_range", 0.02)),
        )
    else:
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported Llama hidden_act={act!r}; only silu (SwiGLU)")
        attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ValueError("unsupported Llama config: attention_bias != mlp_bias (GPTConfig has one bias flag)")
        d, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, d // n_head):
            raise ValueError(f"unsupported Llama head_dim={cfg['head_dim']} != hidden_size/num_attention_heads")
        kw = dict(
            style="llama", vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"], n_head=n_head,
            n_kv_head=cfg.get("num_key_value_heads") or n_head, d_model=d, d_ff=cfg["intermediate_size"],
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            dropout=float(cfg.get("attention_dropout", 0.0)), bias=attn_bias,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=float(cfg.get("initializer_range", 0.02)),
        )
    kw["extra"] = extra
    kw.update(overrides)
    return GPTConfig(**kw)


def hf_config_from_gpt(config: GPTConfig, dtype: torch.dtype | None = None, bos_token_id=None,
                       eos_token_id=None):
    """The transformers config (`GPT2Config` or `LlamaConfig`) matching a `GPTConfig`."""
    import transformers

    bos = bos_token_id if bos_token_id is not None else config.extra.get("bos_token_id")
    eos = eos_token_id if eos_token_id is not None else config.extra.get("eos_token_id")
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=bool(config.tie_embeddings),
                  bos_token_id=bos, eos_token_id=eos, initializer_range=config.init_std)
    if config.style == "gpt2":
        if not config.bias:
            raise ValueError("GPT-2 export needs bias=True (GPT2LMHeadModel always has biases)")
        if config.n_kv_head != config.n_head:
            raise ValueError("GPT-2 export does not support grouped-query attention (n_kv_head != n_head)")
        hf = transformers.GPT2Config(
            n_embd=config.d_model, n_layer=config.n_layer, n_head=config.n_head, n_inner=config.d_ff,
            n_positions=config.max_seq_len, activation_function="gelu_new",
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps, **common)
        hf.architectures = ["GPT2LMHeadModel"]
    elif config.style == "llama":
        hf = transformers.LlamaConfig(
            hidden_size=config.d_model, num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
            head_dim=config.head_dim, intermediate_size=config.d_ff,
            max_position_embeddings=config.max_seq_len, hidden_act="silu", rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta, attention_bias=bool(config.bias), mlp_bias=bool(config.bias),
            attention_dropout=config.dropout, **common)
        hf.architectures = ["LlamaForCausalLM"]
    else:
        raise ValueError(f"unsupported style {config.style!r}")
    if dtype is not None:
        # transformers 5 reads `dtype`, 4.x `torch_dtype` (and 5 warns when it is set).
        if int(transformers.__version__.split(".")[0]) >= 5:
            hf.dtype = dtype
        else:
            hf.torch_dtype = dtype
    return hf


# --------------------------------------------------------------------------------------------------
# Weight conversion.


def _hf_to_gpt(name: str, t: torch.Tensor, config: GPTConfig) -> dict[str, torch.Tensor]:
    """One HF tensor -> {GPT name: tensor} (empty for tensors GPT does not keep)."""
    if config.style == "gpt2":
        name = name.removeprefix("transformer.")
        # Old checkpoints store the causal-mask buffers; GPT uses SDPA's causal flag.
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return {}
        simple = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
                  "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias",
                  "lm_head.weight": "lm_head.weight"}
        if name in simple:
            if name == "wpe.weight":
                t = t[:config.max_seq_len]  # allows a shorter max_seq_len override
            return {simple[name]: t}
        parts = name.split(".")  # h.{i}.<module...>.<param>
        if parts[0] != "h":
            raise ValueError(f"unexpected GPT-2 tensor {name!r}")
        pre, sub = f"blocks.{parts[1]}.", ".".join(parts[2:])
        norms = {"ln_1": "attn_norm", "ln_2": "mlp_norm"}
        if parts[2] in norms:
            return {pre + f"{norms[parts[2]]}.{parts[3]}": t}
        if sub == "attn.c_attn.weight":  # Conv1D [d, 3d] -> three nn.Linear [d, d]
            q, k, v = t.t().chunk(3, dim=0)
            return {pre + "attn.q_proj.weight": q, pre + "attn.k_proj.weight": k, pre + "attn.v_proj.weight": v}
        if sub == "attn.c_attn.bias":
            q, k, v = t.chunk(3, dim=0)
            return {pre + "attn.q_proj.bias": q, pre + "attn.k_proj.bias": k, pre + "attn.v_proj.bias": v}
        linears = {"attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
        mod, param = sub.rsplit(".", 1)
        if mod in linears:
            return {pre + f"{linears[mod]}.{param}": t.t() if param == "weight" else t}
        raise ValueError(f"unexpected GPT-2 tensor {name!r}")

    if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer
        return {}
    simple = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "final_norm.weight",
              "lm_head.weight": "lm_head.weight"}
    if name in simple:
        return {simple[name]: t}
    parts = name.split(".")  # model.layers.{i}.<module...>.<param>
    if parts[:2] != ["model", "layers"]:
        raise ValueError(f"unexpected Llama tensor {name!r}")
    pre, sub = f"blocks.{parts[2]}.", ".".join(parts[3:])
    sub = (sub.replace("self_attn.", "attn.").replace("input_layernorm", "attn_norm")
           .replace("post_attention_layernorm", "mlp_norm"))
    return {pre + sub: t}


def _gpt_to_hf(gpt: GPT) -> dict[str, torch.Tensor]:
    """GPT state -> HF state dict (contiguous CPU tensors, tied head omitted)."""
    c = gpt.config
    sd = {k: v.detach() for k, v in gpt.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if c.style == "gpt2":
        out["transformer.wte.weight"] = sd["tok_emb.weight"]
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
        for i in range(c.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + f"{theirs}.weight"] = sd[p + f"{ours}.weight"]
                out[h + f"{theirs}.bias"] = sd[p + f"{ours}.bias"]
            qkv = [sd[p + f"attn.{x}_proj.weight"] for x in "qkv"]
            out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()  # Conv1D is [in, out]
            out[h + "attn.c_attn.bias"] = torch.cat([sd[p + f"attn.{x}_proj.bias"] for x in "qkv"])
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[h + f"{theirs}.weight"] = sd[p + f"{ours}.weight"].t()
                out[h + f"{theirs}.bias"] = sd[p + f"{ours}.bias"]
        out["transformer.ln_f.weight"] = sd["final_norm.weight"]
        out["transformer.ln_f.bias"] = sd["final_norm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        renames = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn"}
        for k, v in sd.items():
            if k.startswith("blocks."):
                _, i, mod, rest = k.split(".", 3)
                out[f"model.layers.{i}.{renames.get(mod, mod)}.{rest}"] = v
        out["model.norm.weight"] = sd["final_norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Load / save.


def _shard_files(path: Path) -> list[Path]:
    if (path / SAFETENSORS_INDEX).is_file():
        index = json.loads((path / SAFETENSORS_INDEX).read_text())
        return [path / f for f in sorted(set(index["weight_map"].values()))]
    if (path / SAFETENSORS).is_file():
        return [path / SAFETENSORS]
    found = sorted(p.name for p in path.iterdir())
    raise ValueError(f"no {SAFETENSORS} or {SAFETENSORS_INDEX} in {path} (found {found}); "
                     "only safetensors checkpoints are supported")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def load_hf(path: str | os.PathLike, dtype=torch.float32, kernels: str = "torch", device="cpu",
            **overrides) -> GPT:
    """Load a local Hugging Face `GPT2LMHeadModel` / `LlamaForCausalLM` folder into a `GPT`.

    `overrides` go to `GPTConfig` (e.g. max_seq_len, dropout, activation_checkpointing)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder: config.json is missing")
    dtype = _dtype(dtype)
    config = gpt_config_from_hf(json.loads((path / "config.json").read_text()), kernels=kernels, **overrides)

    # Meta device: no memory and no random init; real tensors come from the checkpoint.
    with torch.device("meta"):
        model = GPT(config, init=False)
    meta_state = model.state_dict()
    expected = set(meta_state)

    state: dict[str, torch.Tensor] = {}
    for file in _shard_files(path):
        for name, t in load_file(str(file), device=str(device)).items():
            for ours, v in _hf_to_gpt(name, t, config).items():
                if ours not in expected:
                    raise ValueError(f"{file.name}: tensor {name!r} maps to unknown parameter {ours!r}")
                state[ours] = v.to(dtype).contiguous()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # HF may store the tied copy; the tie is rebuilt below
        expected.discard("lm_head.weight")
    missing = expected - state.keys()
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for: {sorted(missing)}")
    for k, v in state.items():
        want = meta_state[k].shape
        if v.shape != want:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(want)}")

    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.tie_weights()
    model.reset_buffers(device)  # non-persistent RoPE tables are still on meta
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover}")
    return model.eval()


def save_hf(gpt: GPT, path: str | os.PathLike, tokenizer=None) -> None:
    """Write `gpt` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    `tokenizer`: a `tokenizers.Tokenizer` (wrapped in `PreTrainedTokenizerFast`, with bos/eos/unk
    set to `<|endoftext|>` when it has one) or a transformers tokenizer; saved for `AutoTokenizer`."""
    import transformers
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_tok = _wrap_tokenizer(tokenizer, gpt.config.max_seq_len) if tokenizer is not None else None
    eos = getattr(hf_tok, "eos_token_id", None) if hf_tok is not None else None
    bos = getattr(hf_tok, "bos_token_id", None) if hf_tok is not None else None
    dtype = gpt.tok_emb.weight.dtype
    hf_config = hf_config_from_gpt(gpt.config, dtype=dtype, bos_token_id=bos, eos_token_id=eos)
    hf_config.save_pretrained(path)
    save_file(_gpt_to_hf(gpt), str(path / SAFETENSORS), metadata={"format": "pt"})
    gen = transformers.GenerationConfig(bos_token_id=hf_config.bos_token_id,
                                        eos_token_id=hf_config.eos_token_id)
    gen.save_pretrained(path)
    if hf_tok is not None:
        hf_tok.save_pretrained(path)


def _wrap_tokenizer(tokenizer, max_len: int):
    import transformers

    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        special = {}
        if tokenizer.token_to_id("<|endoftext|>") is not None:
            special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_len, **special)
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    raise ValueError(f"unsupported tokenizer type {type(tokenizer).__name__}: "
                     "pass a tokenizers.Tokenizer or a transformers tokenizer")


def save_lora_adapter(state: dict[str, torch.Tensor], config: GPTConfig, rank: int, alpha: float,
                      path: str | os.PathLike, base_model: str) -> None:
    """One LoRA adapter of a llama-style GPT (`agents.lora.adapter_state_dict` keys) as a PEFT adapter folder
    (adapter_config.json + adapter_model.safetensors, keys under `base_model.model.` as peft saves them) over
    the HF Llama folder `save_hf` writes for its base: what peft's `PeftModel.from_pretrained` and vLLM's
    `--lora-modules name=path` load. Llama only: HF GPT-2 fuses q, k, v into one Conv1D (c_attn), and vLLM's
    GPT2LMHeadModel takes no LoRA adapters anyway (it does not implement SupportsLoRA)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if config.style != "llama":
        raise ValueError(f"PEFT adapter folders are written for llama-style models only, not {config.style!r}")
    renames = {"attn": "self_attn"}  # as _gpt_to_hf: blocks.i.attn.q_proj -> model.layers.i.self_attn.q_proj
    out = {}
    for key, t in state.items():
        _, i, mod, rest = key.split(".", 3)
        out[f"base_model.model.model.layers.{i}.{renames.get(mod, mod)}.{rest}"] = t.detach().to("cpu").contiguous()
    targets = sorted({k.split(".")[-3] for k in out})  # ...q_proj.lora_A.weight -> q_proj
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=base_model).save_pretrained(str(path))
    save_file(out, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
