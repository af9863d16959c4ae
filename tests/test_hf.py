"""Hugging Face adapter: logits parity both ways and both styles, meta-device loading, sharded
checkpoints, config round trips, tokenizer saving and clear errors. Everything is built locally."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import GPT, GPTConfig  # noqa: E402
from model import hf as hf_mod  # noqa: E402
from model.hf import gpt_config_from_hf, hf_config_from_gpt, load_hf, save_hf  # noqa: E402
from tests.trainutil import byte_bpe_tokenizer  # noqa: E402

V = 101
ATOL = 1e-4


def hf_gpt2(**kw):
    cfg = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def hf_llama(**kw):
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0, rms_norm_eps=1e-5)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


@torch.no_grad()
def randomize(model, seed=0):
    """Larger-than-init random weights (norm gains and biases too) so parity is a real test."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:
            p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tokens(seed=1, shape=(2, 16)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


HF_BUILDERS = {"gpt2": hf_gpt2, "llama": hf_llama}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_load_hf_parity(style, tmp_path):
    ref = randomize(HF_BUILDERS[style]())
    ref.save_pretrained(tmp_path)
    gpt = load_hf(tmp_path)
    assert isinstance(gpt, GPT) and gpt.config.style == style
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gpt(x), ref(x).logits, rtol=0, atol=ATOL)
    if gpt.config.tie_embeddings:
        assert gpt.lm_head.weight is gpt.tok_emb.weight


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_save_hf_parity(style, tmp_path):
    kw = dict(n_kv_head=2, rope_theta=500.0) if style == "llama" else {}
    gpt = randomize(GPT(GPTConfig(style=style, vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=32, **kw)))
    save_hf(gpt, tmp_path)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[style]
    assert type(ref).__name__ == expected
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, gpt(x), rtol=0, atol=ATOL)
    # And back again: the round trip is lossless.
    again = load_hf(tmp_path)
    for (n, a), (_, b) in zip(gpt.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_llama_tied_and_gpt2_untied_round_trip(tmp_path):
    for i, (style, tie) in enumerate([("llama", True), ("gpt2", False)]):
        gpt = randomize(GPT(GPTConfig(style=style, vocab_size=V, n_layer=1, n_head=4, d_model=64,
                                      max_seq_len=32, tie_embeddings=tie)))
        save_hf(gpt, tmp_path / str(i))
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / str(i)).eval()
        back = load_hf(tmp_path / str(i))
        assert back.config.tie_embeddings == tie
        assert (back.lm_head.weight is back.tok_emb.weight) == tie
        x = tokens()
        with torch.no_grad():
            torch.testing.assert_close(ref(x).logits, gpt(x), rtol=0, atol=ATOL)
            torch.testing.assert_close(back(x), gpt(x), rtol=0, atol=0)


def test_load_hf_uses_meta_device_and_skips_random_init(tmp_path, monkeypatch):
    randomize(hf_llama()).save_pretrained(tmp_path)
    built_on = []
    orig_init = GPT.__init__

    def spy_init(self, config, init=True):
        built_on.append((torch.empty(0).device.type, init))
        orig_init(self, config, init=init)

    def no_random_init(self):
        raise AssertionError("load_hf must not run the random init")

    monkeypatch.setattr(GPT, "__init__", spy_init)
    monkeypatch.setattr(GPT, "init_weights", no_random_init)
    gpt = load_hf(tmp_path)
    assert built_on == [("meta", False)]
    tensors = [*gpt.parameters(), *gpt.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert gpt.rope_cos.device.type == "cpu" and gpt.rope_cos.dtype == torch.float32


def test_load_hf_dtype_and_sharded(tmp_path):
    ref = randomize(hf_gpt2())
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    gpt = load_hf(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in gpt.parameters())
    gpt32 = load_hf(tmp_path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gpt32(x), ref(x).logits, rtol=0, atol=ATOL)
        assert (gpt(x) - gpt32(x)).abs().max() < 0.1  # bf16 is close, not equal


def test_overrides_and_shorter_positions(tmp_path):
    """max_seq_len=16 keeps the first 16 learned positions: the same logits as the Hugging Face model
    on up to 16 tokens, an error beyond; activation checkpointing gives the gradients of the model
    without it."""
    ref = randomize(hf_gpt2())
    ref.save_pretrained(tmp_path)
    gpt = load_hf(tmp_path, max_seq_len=16, activation_checkpointing=True)
    x = tokens(shape=(2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gpt(x), ref(x).logits, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        gpt(tokens(shape=(1, 17)))
    plain = load_hf(tmp_path, max_seq_len=16)
    grads = []
    assert gpt.config.dropout == 0.1  # GPT-2's default: the same masks on both sides
    for model in (gpt.train(), plain.train()):
        torch.manual_seed(0)
        model.loss(x, x).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert gpt.config.activation_checkpointing and not plain.config.activation_checkpointing
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7, msg=n)


def test_config_round_trip():
    for cfg in (GPTConfig(style="gpt2", vocab_size=V, n_layer=3, n_head=4, d_model=64, d_ff=200, max_seq_len=48),
                GPTConfig(style="llama", vocab_size=V, n_layer=3, n_head=8, n_kv_head=2, d_model=64,
                          max_seq_len=48, rope_theta=1234.0, norm_eps=1e-6, tie_embeddings=True)):
        back = gpt_config_from_hf(hf_config_from_gpt(cfg))
        for f in ("style", "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len",
                  "bias", "norm_eps", "rope_theta", "tie_embeddings"):
            assert getattr(back, f) == getattr(cfg, f), f
        # Also from the plain config.json dict
        back2 = gpt_config_from_hf(json.loads(hf_config_from_gpt(cfg).to_json_string()))
        assert back2 == back


def test_rope_theta_from_transformers4_style_dict():
    d = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
             num_attention_heads=4, rope_theta=321.0)
    assert gpt_config_from_hf(d).rope_theta == 321.0
    with pytest.raises(ValueError, match="rope"):
        gpt_config_from_hf({**d, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_unsupported_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unsupported"):
        load_hf(tmp_path)
    hf_gpt2().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="activation"):
        gpt_config_from_hf(transformers.GPT2Config(activation_function="relu"))
    gqa_gpt2 = GPT(GPTConfig(style="gpt2", vocab_size=V, n_layer=1, n_head=4, n_kv_head=2, d_model=64))
    with pytest.raises(ValueError, match="grouped-query"):
        save_hf(gqa_gpt2, tmp_path / "out")
    with pytest.raises(ValueError, match="tokenizer"):
        save_hf(GPT(GPTConfig(style="llama", vocab_size=V, n_layer=1, n_head=4, d_model=64)),
                tmp_path / "out2", tokenizer=object())


def test_save_hf_with_tokenizer(tmp_path):
    tok = byte_bpe_tokenizer("hello world, this is a tiny tokenizer test")
    gpt = GPT(GPTConfig(style="llama", vocab_size=tok.get_vocab_size(), n_layer=1, n_head=4, d_model=64,
                        max_seq_len=32))
    save_hf(gpt, tmp_path, tokenizer=tok)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "hello world, tiny test"
    assert loaded(text)["input_ids"] == tok.encode(text).ids
    assert loaded.decode(loaded(text)["input_ids"]) == text
    eot = tok.token_to_id("<|endoftext|>")
    assert loaded.eos_token == "<|endoftext|>" and loaded.eos_token_id == eot
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eot
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == eot
    # A transformers tokenizer is saved as is.
    save_hf(gpt, tmp_path / "again", tokenizer=loaded)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again")(text)["input_ids"] == tok.encode(text).ids


def test_hf_key_mapping_is_complete():
    """Every HF tensor maps to a GPT parameter and back (names only, no files)."""
    for style, ref in (("gpt2", hf_gpt2()), ("llama", hf_llama())):
        cfg = gpt_config_from_hf(ref.config)
        gpt = GPT(cfg)
        mapped = {}
        for name, t in ref.state_dict().items():
            mapped.update(hf_mod._hf_to_gpt(name, t, cfg))
        assert set(mapped) == set(gpt.state_dict()), style
        back = hf_mod._gpt_to_hf(gpt)
        hf_keys = set(ref.state_dict())
        if cfg.tie_embeddings:
            hf_keys.discard("lm_head.weight")
        assert set(back) == hf_keys, style


def test_original_gpt2_checkpoint_names(tmp_path):
    """The original `gpt2` files have no `transformer.` prefix and store the causal-mask buffers."""
    from safetensors.torch import save_file

    ref = randomize(hf_gpt2())
    ref.config.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(sd, str(tmp_path / "model.safetensors"))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path)(x), ref(x).logits, rtol=0, atol=ATOL)
