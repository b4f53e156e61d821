"""Prompt-prefix KV cache for the local backend: a prompt's shared start is prefilled once per adapter.

Every request to an expert starts with the same chat-template tokens (SmolLM2's default system
prompt and ``<|im_start|>user``: 25 of the 53 tokens of a one-line question), a conversation
re-sends its earlier turns, and the aggregator and planner prompts open with fixed instructions.
Prefill is compute-bound on CPU (the whole prompt through every projection) and, with k experts,
runs k times. As vLLM's automatic prefix caching does, the keys and values of a prompt are kept
in blocks of ``block`` tokens, each block keyed by its adapter, its tokens and the block before it
(so a block is only ever reused after the very same prefix); a new prompt reuses the longest run
of cached blocks and only the rest of it is prefilled. Keys and values depend on the adapter (LoRA
touches every layer's projections), so blocks are per adapter: a mixed batch of k experts reuses
each expert's own blocks.

Bounded: least recently used blocks go first once ``max_bytes`` is reached (a prefix's later
blocks are evicted before its earlier ones). Whatever changes an adapter's weights clears the
blocks computed with them (:meth:`PrefixCache.forget`, :meth:`PrefixCache.clear`).

Batches: each row reuses what its own adapter has cached. Row ``i`` becomes ``[pad][its cached
tokens][pad][the rest of its prompt]`` (cached parts right-aligned in the columns the cache
supplies, the rests left-padded after them), so the attention mask may have a hole between a row's
cached prefix and its new tokens; position ids follow the mask, as transformers' ``generate``
computes them. Rows keep their own results: the cached keys and values are those the same prompt
would have produced (to float rounding: greedy tokens identical, logits within 1e-4,
tests/experts/test_prefix_cache.py). Sliding-window and recurrent caches are not supported
(:func:`unsupported_reason`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["PrefixCache", "PromptBatch", "unsupported_reason"]

_Key = tuple[str, int, tuple[int, ...]]  # (adapter, id of the block before, this block's tokens)


@dataclass
class _Block:
    key: _Key
    id: int
    kv: torch.Tensor  # (layers, 2, kv_heads, block, head_dim): keys [:, 0], values [:, 1]
    nbytes: int


@dataclass
class PromptBatch:
    """Inputs for one ``generate`` call: the full prompts (cached parts included) and the cache to start from.

    Row ``i`` is laid out as ``[pad][its cached tokens][pad][the rest of its prompt]``: the first
    ``cached`` columns hold what the cache supplies (each row's ``reused[i]`` tokens right-aligned),
    the columns after them the left-padded rest, prefilled by ``generate``."""

    ids: torch.Tensor
    mask: torch.Tensor
    cache: Any  # a DynamicCache holding the reused prefixes (empty when nothing is reused), or None: no caching
    reused: list[int] = field(default_factory=list)  # tokens of each row taken from the cache
    keys: list[str] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)

    @property
    def cached(self) -> int:
        """Columns supplied by the cache (the longest reused prefix)."""
        return max(self.reused, default=0)

    def column(self, row: int, token: int) -> int:
        """The column of token ``token`` of row ``row`` (at or past the prompt's end: a generated token)."""
        h, c = self.reused[row], self.cached
        if token < h:
            return c - h + token
        return self.ids.shape[1] - (len(self.prompts[row]) - token)


class PrefixCache:
    """Keys and values of prompt prefixes, per adapter, in blocks of ``block`` tokens; LRU within ``max_bytes``."""

    def __init__(self, *, max_bytes: int, block: int = 8) -> None:
        if block < 1:
            raise ValueError("block must be at least 1 token")
        self.max_bytes = int(max_bytes)
        self.block = int(block)
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()
        self._lock = threading.Lock()
        self._next_id = 1
        self.bytes = 0
        self.hits = 0  # tokens reused
        self.misses = 0  # prompt tokens prefilled while the cache was on

    # -- bookkeeping ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._blocks)

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self._blocks), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "tokens_reused": self.hits, "tokens_prefilled": self.misses}

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = 0

    def forget(self, adapter: str) -> None:
        """Drop every block computed with ``adapter`` (its weights changed or it is gone)."""
        with self._lock:
            for key in [k for k in self._blocks if k[0] == adapter]:
                self.bytes -= self._blocks.pop(key).nbytes

    # -- lookup -----------------------------------------------------------------------------------------
    def _chain(self, adapter: str, tokens: Sequence[int], limit: int) -> list[_Block]:
        """The cached blocks of ``tokens``' first ``limit`` tokens, from the start, while they are cached."""
        out: list[_Block] = []
        parent = 0
        b = self.block
        for start in range(0, limit - b + 1, b):
            blk = self._blocks.get((adapter, parent, tuple(tokens[start : start + b])))
            if blk is None:
                break
            out.append(blk)
            parent = blk.id
        return out

    def cached_tokens(self, adapter: str, tokens: Sequence[int]) -> int:
        """How many of ``tokens``' first tokens a prompt on ``adapter`` would take from the cache now."""
        with self._lock:
            return len(self._chain(adapter, tokens, len(tokens) - 1)) * self.block

    def prepare(self, model: Any, keys: Sequence[str], prompts: Sequence[list[int]], pad_id: int,
                device: Any) -> PromptBatch:
        """Inputs for ``generate`` that reuse the cached prefix of every row (``keys``: each row's adapter)."""
        import torch

        # at least one token of every prompt is prefilled: generate needs its logits
        with self._lock:
            chains = [self._chain(k, p, len(p) - 1) for k, p in zip(keys, prompts)]
            for c in chains:  # touch the used blocks, later ones first: a prefix's start is evicted last
                for blk in reversed(c):
                    self._blocks.move_to_end(blk.key)
            reused = [len(c) * self.block for c in chains]
            c = max(reused)
            width = c + max(len(p) - h for p, h in zip(prompts, reused))
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, (p, h) in enumerate(zip(prompts, reused)):
                ids[i, c - h : c] = torch.tensor(p[:h], dtype=torch.long)
                mask[i, c - h : c] = 1
                ids[i, width - (len(p) - h) :] = torch.tensor(p[h:], dtype=torch.long)
                mask[i, width - (len(p) - h) :] = 1
            cache = _new_cache(model)
            if c:
                first = next(ch[0].kv for ch in chains if ch)
                layers, _, heads, _, hd = first.shape
                kv = first.new_zeros((len(prompts), layers, 2, heads, c, hd))
                for i, (ch, h) in enumerate(zip(chains, reused)):
                    if h:
                        kv[i, :, :, :, c - h :] = torch.cat([blk.kv for blk in ch], dim=3)
                kv = kv.to(device)
                for layer in range(layers):
                    cache.update(kv[:, layer, 0].contiguous(), kv[:, layer, 1].contiguous(), layer)
            self.hits += sum(reused)
            self.misses += sum(len(p) - h for p, h in zip(prompts, reused))
        return PromptBatch(ids.to(device), mask.to(device), cache, reused, list(keys), [list(p) for p in prompts])

    # -- store ------------------------------------------------------------------------------------------
    def store(self, batch: PromptBatch, cache: Any, generated: Sequence[Sequence[int]] | None = None) -> int:
        """Keep the full blocks of every row's tokens from ``cache`` (the one ``batch`` started ``generate``
        with, now holding the prompts and what was decoded after them); returns how many new blocks were stored.

        ``generated``: each row's decoded tokens whose keys and values are in ``cache`` (the last token
        decoded never went through the model), so a conversation's next turn, which re-sends this answer,
        finds it cached too."""
        import torch

        layers = getattr(cache, "layers", None)
        if not layers or self.max_bytes <= 0:
            return 0
        b = self.block
        stored = 0
        with self._lock:
            for row, (adapter, prompt) in enumerate(zip(batch.keys, batch.prompts)):
                if generated is not None:
                    prompt = [*prompt, *generated[row]]
                end = len(prompt) // b * b
                if end and batch.column(row, end - 1) >= layers[0].keys.shape[2]:
                    continue  # not all of it is in the cache: store nothing of this row
                known = self._chain(adapter, prompt, end)
                first = len(known) * b
                if first >= end:
                    continue
                # the row's tokens [first, end) as at most two runs of adjacent columns (cached | prefilled)
                parts = []
                h = batch.reused[row]
                for lo, hi in ((first, min(end, h)), (max(first, h), end)):
                    if lo < hi:
                        c0 = batch.column(row, lo)
                        parts.append(torch.stack([torch.stack([lay.keys[row, :, c0 : c0 + hi - lo],
                                                               lay.values[row, :, c0 : c0 + hi - lo]])
                                                  for lay in layers]))
                kv = torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]
                if kv.shape[3] != end - first:  # the cache is not laid out as prepared: store nothing
                    continue
                parent = known[-1].id if known else 0
                chain = list(known)
                for j, start in enumerate(range(first, end, b)):
                    part = kv[:, :, :, j * b : (j + 1) * b].clone()
                    key = (adapter, parent, tuple(prompt[start : start + b]))
                    blk = _Block(key, self._next_id, part, part.numel() * part.element_size())
                    self._next_id += 1
                    old = self._blocks.pop(key, None)
                    if old is not None:
                        self.bytes -= old.nbytes
                    self._blocks[key] = blk
                    self.bytes += blk.nbytes
                    parent = blk.id
                    chain.append(blk)
                    stored += 1
                for blk in reversed(chain):  # a prefix's start is used by every later block: evicted last
                    self._blocks.move_to_end(blk.key)
            self._evict()
        return stored

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._blocks:
            _, blk = self._blocks.popitem(last=False)
            self.bytes -= blk.nbytes


def unsupported_reason(model: Any) -> str | None:
    """Why prompt prefixes of ``model`` cannot be reused, or None when they can.

    A sliding-window layer keeps only its last tokens, so a prompt's columns would not stay where
    :class:`PromptBatch` put them; a recurrent (linear) cache has no per-token keys and values."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "no model config"
    layer_types = getattr(cfg, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        return "layers other than full attention"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    return None


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56 takes no config
        return DynamicCache()
