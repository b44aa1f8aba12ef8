"""Tiny random models of every supported architecture, saved as HF folders for the tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

# hidden 256 and head_dim 64 keep every row a multiple of 256, so llama.cpp's k-quants apply.
BASE: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.08,
    rms_norm_eps=1e-6,
)

# Mixture-of-experts models route every token by one channel of the residual stream (see clear_routing).
ROUTING_CHANNEL = 0
ROUTING_LEVEL = 1.0  # that channel's value in every token's embedding, sign drawn per token
ROUTING_GAIN = 10.0  # the MLP input norm's weight on it (the residual stream around it grows to an RMS of ~2)
ROUTING_SLOPE = 4.0  # the routers' weight on it: +slope for the first k experts, -slope for the other k

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    # q/k/v biases: folding must leave them alone
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False),
    # explicit head_dim: attention width 4 x 32 = 128 differs from hidden_size 256
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], head_dim=32, sliding_window=None),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=64, tie_word_embeddings=False),
    "gemma3_text": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=64,
                        num_key_value_heads=1, sliding_window=512, query_pre_attn_scalar=64),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], num_key_value_heads=4,
                 pad_token_id=0, tie_word_embeddings=False),
    # q/k RMSNorm over the whole projection
    "olmo2": dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"], tie_word_embeddings=False),
    # the attention, embedding, residual and logits multipliers, away from 1
    "granite": dict(model_type="granite", architectures=["GraniteForCausalLM"], attention_multiplier=0.05,
                    embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=2.0),
    # mixture-of-experts MLPs; attention as llama's
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False),
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                      tie_word_embeddings=False),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=128, head_dim=64, norm_topk_prob=True,
                      tie_word_embeddings=False),
    # 4 layers: the 4th has no RoPE
    "smollm3": dict(model_type="smollm3", architectures=["SmolLM3ForCausalLM"], num_hidden_layers=4, pad_token_id=2),
    # Gemma 3 as released from 4B up: a multimodal checkpoint, the text model (BASE, overrides) in text_config
    "gemma3": dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                   text_config=dict(head_dim=64, num_key_value_heads=1, sliding_window=512, query_pre_attn_scalar=64),
                   vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8),
                   mm_tokens_per_image=4, image_token_index=3, boi_token_index=4, eoi_token_index=5),
    # Mistral Small 3.x: a multimodal checkpoint (Pixtral vision tower), the text model a mistral in text_config
    "mistral3": dict(model_type="mistral3", architectures=["Mistral3ForConditionalGeneration"],
                     text_config=dict(model_type="mistral", head_dim=64, sliding_window=None, tie_word_embeddings=False),
                     vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                        head_dim=32, image_size=32, patch_size=8),
                     image_token_index=10, tie_word_embeddings=False),
    # GPT-OSS: attention sinks, biased q/k/v/o projections, sliding window on every other layer, YaRN RoPE as
    # released but truncated (as llama.cpp runs it), mixture-of-experts MLPs (unquantized experts: the
    # converter takes them as they are, MXFP4 is not needed)
    "gpt_oss": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], head_dim=64, num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=256, sliding_window=512, max_position_embeddings=131072,
                    tie_word_embeddings=False,
                    rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=True,
                                         original_max_position_embeddings=4096, rope_theta=150000.0)),
    # sliding window on every other layer (the window is set by the tests), attention logits soft-capped
    # low enough to bend them (about 1.6 before the cap), final logits soft-capped as released
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=64, sliding_window=512,
                   query_pre_attn_scalar=64, attn_logit_softcapping=4.0, final_logit_softcapping=30.0),
}


def build_tiny_model(
    out_dir: Path,
    model_type: str,
    tokenizer_dir: Path,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    spm_tokenizer: bool = False,
    converter_tokenizer: bool = False,
    **overrides: Any,
) -> Path:
    """Save a random model of `model_type` with SmolLM2's tokenizer to out_dir.

    spm_tokenizer adds a small SentencePiece tokenizer.model, which llama.cpp's converter prefers
    for qwen2 and phi3: their HF tokenizer classes (chosen from model_type by transformers 5)
    re-tokenize SmolLM2's vocabulary in a way the converter does not recognize.

    converter_tokenizer makes SmolLM2's tokenizer one that llama.cpp's converter accepts for this
    architecture and that transformers and llama.cpp then apply alike (CONVERTER_TOKENIZER).
    """
    from transformers import AutoConfig

    from seal_gguf.model.architectures import transformers_class

    torch.manual_seed(seed)
    tokens = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    spec = {**CONFIGS[model_type]}
    if "text_config" in spec:  # multimodal: the tiny text model inside
        spec["text_config"] = {**BASE, **spec["text_config"], **overrides, **tokens}
    else:
        spec = {**BASE, **spec, **overrides, **tokens}
    spec.pop("architectures")
    kind = spec.pop("model_type")
    config = AutoConfig.for_model(kind, **spec)
    model = transformers_class(kind).from_config(config).to(dtype).eval()
    clear_routing(model, kind, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file() and item.name not in ("config.json", "generation_config.json"):
            shutil.copy2(item, Path(out_dir) / item.name)
    if spm_tokenizer:
        write_spm_tokenizer(Path(out_dir) / "tokenizer.model", tokenizer_dir)
    if converter_tokenizer and model_type in CONVERTER_TOKENIZER:
        CONVERTER_TOKENIZER[model_type](Path(out_dir))
    return Path(out_dir)


def clear_routing(model: torch.nn.Module, model_type: str, seed: int) -> None:
    """Give a tiny mixture-of-experts model's routers a clear margin, so that no rounding (f16, bf16, q8_0,
    q4_k_m; base or folded) sends a token to other experts.

    A random router's top-k has near-ties: among 64 tokens x 2 layers some token's k-th and (k+1)-th
    logits lie closer than the rounding moves them, and that token's output then jumps by far more than
    rounding (scaling the router does not help: the choice is scale-free). Here the residual stream's
    channel ROUTING_CHANNEL holds +-ROUTING_LEVEL from the embedding alone (sign drawn per token; the rows
    of o_proj and of the MLPs' down projections that would write it are zero, and so are the MLPs' input
    columns that would read it: it feeds the routers alone), and every router adds
    +-ROUTING_SLOPE times it (after the MLP input norm, whose weight there is ROUTING_GAIN) to its random
    logits: +slope for the first k experts, -slope for the other k. Each token goes to one half of the
    experts with a margin of 2 x slope x |normed channel| (test_moe_routing_has_a_clear_margin measures it),
    and its mixture weights inside that half stay those of the random router. Without MoE layers: nothing
    changes."""
    routers = [(name, p) for name, p in model.named_parameters() if name.endswith((".mlp.gate.weight",
                                                                                     ".mlp.router.weight"))]
    if not routers:
        return
    c, config = ROUTING_CHANNEL, model.config.get_text_config()
    k = int(config.num_experts_per_tok)
    signs = torch.where(torch.rand(config.vocab_size, generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, c] = ROUTING_LEVEL * signs
        for name, p in model.named_parameters():
            if name.endswith((".o_proj.weight", ".down_proj.weight")) or name.endswith((".o_proj.bias", ".down_proj.bias")):
                p[c] = 0  # nn.Linear: output rows
            elif name.endswith((".gate_proj.weight", ".up_proj.weight", ".shared_expert_gate.weight")):
                p[:, c] = 0  # nn.Linear inputs of the MLPs: the channel feeds the routers alone
            elif name.endswith(".experts.gate_up_proj"):  # fused experts: [E, 2 x inter, hidden], gpt-oss [E, hidden, 2 x inter]
                (p[:, c, :] if model_type == "gpt_oss" else p[..., c]).zero_()
            elif name.endswith(".post_attention_layernorm.weight"):
                p[c] = ROUTING_GAIN
            elif name.endswith(".experts.down_proj_bias"):
                p[..., c] = 0
            elif name.endswith(".experts.down_proj"):  # fused experts: [E, hidden, inter], gpt-oss [E, inter, hidden]
                (p[..., c] if model_type == "gpt_oss" else p[:, c, :]).zero_()
        for _, p in routers:
            assert p.shape[0] == 2 * k, "clear_routing needs k = half the experts"
            p[:, c] = ROUTING_SLOPE * torch.tensor([1.0] * k + [-1.0] * k)


def _edit_json(path: Path, edit: Any) -> None:
    import json

    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _gpt2_tokenizer_class(model_dir: Path) -> None:
    """phi3: transformers 5 loads the tokenizer.json as it is (phi3 is among the model types whose
    declared tokenizer class it overrides), and the converter takes a BPE vocabulary, checked like
    llama's, when tokenizer_config.json declares GPT2Tokenizer (as Phi-4 does); otherwise it wants a
    SentencePiece tokenizer.model."""
    _edit_json(model_dir / "tokenizer_config.json", lambda c: c.update(tokenizer_class="GPT2Tokenizer"))


def _no_merges_into_newlines(model_dir: Path) -> None:
    """qwen2: transformers 5 always tokenizes qwen2 with Qwen2Tokenizer (Qwen's pre-tokenizer regex),
    which llama.cpp's converter does not recognize over SmolLM2's vocabulary. Without the 25 merges
    that join a newline to a preceding space or character, Qwen's pre-tokenizer splits the converter's
    check text exactly as SmolLM2's does, so the converter takes the vocabulary (as SmolLM2's) with no
    flag. The two pre-tokenizers still differ on runs of newlines and on indentation after a newline
    (tests/test_architectures.py records it): logits are compared on token ids."""
    import re

    def drop(tokenizer: dict[str, Any]) -> None:
        merges = tokenizer["model"]["merges"]
        tokenizer["model"]["merges"] = [m for m in merges if not re.search("[^\u010a\u010d][\u010a\u010d]",
                                                                            "".join(m))]

    _edit_json(model_dir / "tokenizer.json", drop)


def _sentencepiece_gemma(model_dir: Path) -> None:
    """gemma2: llama.cpp's converter reads Gemma 2's vocabulary from a SentencePiece tokenizer.model only,
    and transformers 5 always tokenizes gemma2 with GemmaTokenizer (BPE with byte fallback, spaces as
    "▁", no prefix space). The tiny model gets write_spm_tokenizer's model and the same vocabulary as
    GemmaTokenizer's tokenizer.json (merges ranked by piece score, as transformers extracts them from a
    SentencePiece model), so both engines split text alike."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    tokenizer_dir = model_dir / "smollm2-tokenizer"
    tokenizer_dir.mkdir()
    shutil.move(model_dir / "tokenizer.json", tokenizer_dir / "tokenizer.json")
    write_spm_tokenizer(model_dir / "tokenizer.model", tokenizer_dir)
    shutil.rmtree(tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    scores = {sp.IdToPiece(i): sp.GetScore(i) for i in range(sp.GetPieceSize())
              if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))}
    merges = sorted(((piece[:k], piece[k:], score) for piece, score in scores.items() for k in range(1, len(piece))
                     if piece[:k] in vocab and piece[k:] in vocab),
                    key=lambda m: (-m[2], vocab[m[0]], vocab[m[1]]))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token="<unk>", fuse_unk=True,
                              byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.save(str(model_dir / "tokenizer.json"))
    _edit_json(model_dir / "tokenizer_config.json", lambda c: c.update(
        tokenizer_class="GemmaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"))


# model_type -> the change that makes SmolLM2's tokenizer convert (and match) for it; none needed for the rest
CONVERTER_TOKENIZER = {"phi3": _gpt2_tokenizer_class, "qwen2": _no_merges_into_newlines,
                       "gemma2": _sentencepiece_gemma}


def write_spm_tokenizer(path: Path, tokenizer_dir: Path) -> None:
    """A byte-fallback SentencePiece BPE model trained on SmolLM2's vocabulary (deterministic)."""
    import io
    import json

    import sentencepiece as spm

    vocab = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    words = [w.replace("\u0120", " ").replace("\u010a", "\n") for w in sorted(vocab, key=vocab.get)]
    lines = [" ".join(words[i:i + 40]) for i in range(0, 20000, 40)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
