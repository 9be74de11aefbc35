"""One compact decoder for the Llama family (Llama, Qwen2, Mistral; Mixtral and Qwen2-MoE), gpt-fast style.

Submodule names mirror Hugging Face's (`embed_tokens`, `layers[i].self_attn.q_proj`, ...), so that checkpoint
tensors map 1:1 by dropping the `model.` prefix, and every projection is a plain nn.Linear that the quantizer
can swap for a quantized one. A mixture-of-experts layer's `mlp` is a MoEFeedForward (model/moe.py), whose
experts are stacked tensors instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.model.config import ModelConfig
from fleetlm.model.moe import MoEFeedForward

# Which cache rows a batch's rows use: None = rows 0..B-1, a slice of rows, or an index tensor [B].
CacheRows = slice | torch.Tensor | None
# Attention of one query per row and head: (q [B, H, 1, D], k, v [B, H_kv, S, D], mask [B, 1, 1, S] | None).
OneQueryAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class KVCache(nn.Module):
    """Static per-layer cache [B, n_kv_heads, S + 1, head_dim]: fixed shapes: decode steps never reallocate.

    One spare slot past max_seq_length is never written nor read: with it a view of the first kv_len slots
    is never the whole buffer, so it is never contiguous. Without it a compiled step guards on that
    contiguity (kv_len * head_dim != S * head_dim) and compiled a second graph when a row reached the last
    slot.
    """

    def __init__(
        self,
        max_batch_size: int,
        n_kv_heads: int,
        max_seq_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.max_seq_length = max_seq_length
        shape = (max_batch_size, n_kv_heads, max_seq_length + 1, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self,
        input_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache_rows: CacheRows = None,
        kv_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, T, D] at slots input_pos [B, T] (per row); return the B rows in use.

        Call row b lives in cache row b, or in cache_rows[b] when given (a continuous batch keeps each
        request in its own row). A slice gives views (no copy); an index tensor gathers. kv_len: return only
        the first kv_len slots, so attention does not scan slots no row has reached yet.
        """
        b = k.shape[0]
        if cache_rows is None:
            cache_rows = slice(0, b)
        if isinstance(cache_rows, slice):
            k_rows, v_rows = self.k_cache[cache_rows], self.v_cache[cache_rows]
            rows = torch.arange(b, device=k.device)[:, None]
            # Advanced indices on dims 0 and 2 put [B, T] first: the target view is [B, T, H_kv, D].
            k_rows[rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
            v_rows[rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        else:
            rows = cache_rows.to(k.device)[:, None]
            self.k_cache[rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
            self.v_cache[rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
            k_rows, v_rows = self.k_cache[cache_rows], self.v_cache[cache_rows]
        kv_len = self.max_seq_length if kv_len is None else kv_len
        return k_rows[:, :, :kv_len], v_rows[:, :, :kv_len]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale after casting back, as the reference implementation does
        # (one fused op instead of five: decoding is dispatch-bound on small ops).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with the config's rope_scaling applied."""
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "dynamic":
        # Dynamic NTK: stretch the base once the sequence outgrows the trained context.
        trained = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        seq_len = max(seq_len or 0, trained)
        factor = float(scaling["factor"])
        base = base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    context = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < context / high) & ~(wavelen > context / low)
    return torch.where(in_band, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] for positions pos [B, T]; angles in float32 whatever the model dtype."""
    angles = pos[..., None].float() * inv_freq.to(pos.device)
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Half-split rotation (the Hugging Face layout), not interleaved pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@torch.no_grad()
def concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One linear whose output is the parts' outputs side by side (same input, same dtype and bias use)."""
    first = parts[0]
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      dtype=first.weight.dtype, device=first.weight.device)
    fused.weight.copy_(torch.cat([p.weight for p in parts]))
    if fused.bias is not None:
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.arch == "llama"  # Qwen2 biases q/k/v only
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.qkv_proj: nn.Module | None = None  # q, k, v in one matmul, set by fuse() for inference
        self.kv_cache: KVCache | None = None
        # one-query attention over a float16 cache (q, k, v, mask -> y), given by setup_caches
        self.half_cache_attention: OneQueryAttention | None = None

    @torch.no_grad()
    def fuse(self) -> None:
        """Concatenate q/k/v into one linear (gpt-fast's wqkv): one weight read and one call, not three.
        For inference only: the separate projections (HF names, LoRA targets) are dropped."""
        self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
        cache_rows: CacheRows = None,
        kv_len: int | None = None,
        rowwise: bool = False,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, h_kv = self.n_heads, self.n_kv_heads
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(b, t, h + 2 * h_kv, self.head_dim).transpose(1, 2)
            qk = apply_rope(qkv[:, : h + h_kv], cos, sin)  # q and k sit side by side: one rotation for both
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + h_kv :]
        else:
            q = self.q_proj(x).view(b, t, h, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, t, h_kv, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, h_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        one_query = one_query_attention
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows, kv_len)
            if k.dtype == torch.float16 and self.half_cache_attention is not None:
                # the engine's float16 cache (setup_caches), read by its kernel
                one_query, q = self.half_cache_attention, q.float()
            else:
                q = q.to(k.dtype)  # a bf16 model keeps an f32 cache on CPU (see setup_caches)
        gqa = self.n_heads != self.n_kv_heads
        if rowwise and kv_len is not None:
            # each query alone over exactly the slots it sees: the very SDPA call of a one-token decode step,
            # so a speculative verify computes bit for bit what plain decoding would (a masked SDPA sums in
            # another order, and quantized activations amplify that 1e-7 to logits 2% apart)
            ends = range(kv_len - t + 1, kv_len + 1)
            rows = [one_query(q[:, :, i:i + 1], k[:, :, :end], v[:, :, :end], None)
                    for i, end in enumerate(ends)]
            y = torch.cat(rows, dim=2)
        elif t == 1:
            y = one_query(q, k, v, mask)
        else:
            k, v = k.to(q.dtype), v.to(q.dtype)  # over a float16 cache: widened (a prompt is compute-bound)
            # mask None: causal for a prompt (t > 1); a single query sees every slot it is given
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                               enable_gqa=gqa)
        y = y.to(x.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row and head, q [B, H, 1, D] over k, v [B, H_kv, S, D] (mask None or
    [B, 1, 1, S]): the H / H_kv query heads that share a KV head attend as that many rows of one head.
    SDPA's enable_gqa copies K and V once per query head on CPU, which made a decode step's attention
    2x slower at 8k slots (Qwen2.5-1.5B: 12 query heads on 2 KV heads)."""
    b, h, _, d = q.shape
    h_kv = k.shape[1]
    if h == h_kv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grouped = q.reshape(b, h_kv, h // h_kv, d)  # query heads kv*G .. kv*G + G - 1 read KV head kv
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).reshape(b, h, 1, d)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse() for inference

    @torch.no_grad()
    def fuse(self) -> None:
        """Concatenate gate and up into one linear (inference only, like Attention.fuse)."""
        self.gate_up_proj = concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def feed_forward(config: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s feed-forward: a dense MLP, or top-k of the config's experts."""
    if not config.is_moe_layer(layer):
        return MLP(config)
    return MoEFeedForward(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                          config.num_experts_per_tok, config.norm_topk_prob,
                          config.shared_expert_intermediate_size)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = feed_forward(config, layer)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
        cache_rows: CacheRows = None,
        kv_len: int | None = None,
        rowwise: bool = False,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos, sin, mask, input_pos, cache_rows, kv_len, rowwise)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A plain float32 tensor, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = rope_inv_freq(config)
        self.max_batch_size = 0
        self.half_cache_attention: OneQueryAttention | None = None  # set by the engine (see setup_caches)
        self.max_seq_length = 0

    def fuse_projections(self) -> None:
        """q/k/v and gate/up as one matmul each, for generation: fewer, larger matmuls per layer."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def setup_caches(
        self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate a static KV cache per layer; forward(idx, input_pos) then reads and writes it.

        A bf16/f16 model on CPU gets an f32 cache: PyTorch's CPU attention in bf16 is 3-5x slower than in
        f32 for one query against the cache (measured in bench/decode.py). Where the engine gave the model
        a kernel for it (`half_cache_attention`, engine/kernels' attend_f16), the cache is float16 on CPU
        whatever the model's dtype: half the bytes a decode step reads at long contexts.
        """
        ref = self.norm.weight
        if dtype is None:
            half = ref.dtype in (torch.bfloat16, torch.float16)
            dtype = torch.float32 if half and ref.device.type == "cpu" else ref.dtype
            if self.half_cache_attention is not None and ref.device.type == "cpu":
                dtype = torch.float16
        c = self.config
        kernel = self.half_cache_attention if dtype == torch.float16 else None
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                max_batch_size, c.num_kv_heads, max_seq_length, c.head_dim, dtype, ref.device
            )
            layer.self_attn.half_cache_attention = kernel
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def reset_caches(self, rows: list[int] | None = None) -> None:
        """Zero the cache of the given batch rows (all rows when None)."""
        for layer in self.layers:
            cache = layer.self_attn.kv_cache
            if cache is None:
                continue
            if rows is None:
                cache.k_cache.zero_()
                cache.v_cache.zero_()
            else:
                cache.k_cache[rows] = 0
                cache.v_cache[rows] = 0

    def remove_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_batch_size = self.max_seq_length = 0

    def sees_all(self, pos: torch.Tensor, kv_len: int | None) -> bool:
        """One query per row, each at slot kv_len - 1: every row sees all kv_len slots and needs no mask
        (SDPA's unmasked path is several times faster on CPU than its masked one)."""
        window = self.config.sliding_window
        return (kv_len is not None and pos.shape[1] == 1 and (window is None or kv_len <= window)
                and bool((pos == kv_len - 1).all()))

    def trailing(self, pos: torch.Tensor, kv_len: int | None) -> bool:
        """Every row's T queries stand at slots kv_len - T .. kv_len - 1, within any sliding window: what a
        row-at-a-time attention (Attention's rowwise) needs, with no mask."""
        t, window = pos.shape[1], self.config.sliding_window
        return (kv_len is not None and (window is None or kv_len <= window)
                and bool((pos == torch.arange(kv_len - t, kv_len, device=pos.device)).all()))

    def plain_causal(self, pos: torch.Tensor, kv_len: int | None) -> bool:
        """Every row's queries stand at slots 0..T-1 and attend over exactly those T slots (a prefill from
        an empty row): SDPA's is_causal then needs no [T, T] mask tensor (256 MB as floats at 8k tokens)."""
        t, window = pos.shape[1], self.config.sliding_window
        return (t > 1 and kv_len == t and (window is None or t <= window)
                and bool((pos == torch.arange(t, device=pos.device)).all()))

    def _mask(self, pos: torch.Tensor, use_cache: bool, kv_len: int | None = None) -> torch.Tensor:
        # Query at position p sees key slots s <= p (and s > p - window with a sliding window).
        key_pos = (
            torch.arange(kv_len or self.max_seq_length, device=pos.device)[None, None, :]
            if use_cache
            else pos[:, None, :]
        )
        query_pos = pos[:, :, None]
        mask = key_pos <= query_pos
        if self.config.sliding_window is not None:
            mask = mask & (key_pos > query_pos - self.config.sliding_window)
        return mask[:, None]  # [B, 1, T, S]

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache_rows: CacheRows = None,
        kv_len: int | None = None,
        unmasked: bool | None = None,
        last: torch.Tensor | None = None,
        rowwise: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (float32). input_pos [B, T]: cache slots/positions per row; None: plain causal.
        last [B]: the one position per row whose logits are wanted (a prefill's last prompt token): logits
        [B, 1, V], without the vocabulary projection of every other position (a quarter of a 0.5B model's
        prefill FLOPs: its 151936-row lm_head).

        cache_rows: the cache row of each batch row (default 0..B-1), for a batch whose requests keep their
        own rows. kv_len: attend over cache slots [0, kv_len) only; every row's input_pos must be < kv_len.
        None: the furthest position + 1 (slots past it are masked for every row, so reading them is waste:
        a 4,096-slot cache would cost its whole length at every step). unmasked: sees_all(input_pos, kv_len)
        or plain_causal(...) when the caller knows it already (a compiled step must not read tensor values:
        each read splits its graph). rowwise: the T queries stand at the last T slots of kv_len (a speculative
        verify); attend one query at a time so that each row's numbers equal a one-token decode step's.
        """
        b, t = idx.shape
        use_cache = input_pos is not None and self.max_seq_length > 0
        if not use_cache:
            kv_len = None
        if input_pos is None:
            pos = torch.arange(t, device=idx.device)[None].expand(b, t)
            window = self.config.sliding_window
            mask = None if window is None or t <= window else self._mask(pos, use_cache=False)
            rowwise = False
        else:
            pos = input_pos if input_pos.dim() == 2 else input_pos[None].expand(b, t)
            if use_cache and kv_len is None:
                kv_len = int(pos.max()) + 1
            rowwise = rowwise and use_cache and self.trailing(pos, kv_len)
            if unmasked is None:
                unmasked = (rowwise or self.sees_all(pos, kv_len)
                            or (use_cache and self.plain_causal(pos, kv_len)))
            mask = None if unmasked else self._mask(pos, use_cache, kv_len)
        x = self.embed_tokens(idx)
        inv_freq = self.inv_freq
        if self.config.rope_type == "dynamic":
            inv_freq = rope_inv_freq(self.config, int(pos.max()) + 1)
        cos, sin = rope_cos_sin(inv_freq, pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, pos if use_cache else None, cache_rows, kv_len, rowwise)
        if last is not None:
            x = x[torch.arange(b, device=x.device), last.to(x.device)][:, None]
        return self.lm_head(self.norm(x)).float()
