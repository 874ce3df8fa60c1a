"""The decoder of data-free generation: hybrid greedy-then-sampled decoding of many sequences at once.

Every prompt is one token (the start id). A fixed number of batch rows decode together, one forward per
token through a preallocated KV cache; when a sequence ends (EOS or max_length) its row is refilled at once
with the next waiting sequence, so the batch stays full until the queue is empty (then ended rows leave the
batch and the cache). Rows of different ages share the cache: each row's keys/values occupy its own span
of slots, masked for the others, and its positions are its own, so a refilled row sees exactly a fresh
sequence (up to floating-point summation order).
"""
import logging
from dataclasses import dataclass

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from utils.errors import InputError

logger = logging.getLogger("llm_qat.generate")
CAPACITY = 2


@dataclass(frozen=True)
class Sampling:
    """The model's sampling defaults, as model.generate(do_sample=True) applies them."""
    temperature: float = 1.0
    top_k: int = 50  # 0: the whole vocabulary
    top_p: float = 1.0

    @classmethod
    def of(cls, generation_config):
        def get(name, default):
            value = getattr(generation_config, name, None)
            return default if value is None else value
        for name, neutral in (("repetition_penalty", 1.0), ("typical_p", 1.0), ("min_p", None),
                              ("no_repeat_ngram_size", 0)):
            if getattr(generation_config, name, None) not in (None, neutral):
                logger.warning("generation_config.%s is not applied", name)
        sampling = cls(float(get("temperature", 1.0)), int(get("top_k", 50)), float(get("top_p", 1.0)))
        if sampling.temperature <= 0:
            raise InputError(f"generation_config.temperature {sampling.temperature}: must be > 0 for sampling")
        return sampling

    def sample(self, logits, u):
        """One token per row from softmax(logits / temperature) truncated to top-k / top-p, by inverse CDF
        at the row's uniform u (so the draw is the row's own, whatever else is in the batch)."""
        k = min(self.top_k or logits.shape[-1], logits.shape[-1])
        values, indices = (logits / self.temperature).topk(k)  # sorted, most likely first
        probs = values.softmax(-1)
        if self.top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        choice = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=k - 1)
        return indices.gather(-1, choice[:, None]).squeeze(-1)


class SlotLayer(DynamicLayer):
    """One layer's KV cache with room for `capacity` slots from the start: a step writes its key/value in
    place at the shared write slot (DynamicLayer's torch.cat copies the whole cache at every step)."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)
        self.value_buffer = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self):
        return self.length

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def compact(self, index, length):
        """Move every row's slots to index[row] (gathered along the slot axis); `length` slots stay used."""
        if self.is_initialized:
            for name in ("key_buffer", "value_buffer"):
                buf = getattr(self, name)
                idx = index[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
                getattr(self, name)[:, :, :length] = buf.gather(2, idx)
        self.length = length


@torch.inference_mode()
def generate_batch(model, start_ids, prefix_lengths, max_length, sampling, seeds, eos_ids, batch_size=None):
    """Hybrid decoding of sequences k = 0..n-1: start id start_ids[k], greedy up to prefix_lengths[k] tokens
    (start id included), then sampled with the uniforms of seeds[k], until EOS or max_length. batch_size rows
    decode together (default: all n at once), each refilled with the next sequence as soon as its own ends.
    Yields (k, token ids) for each sequence as it ends."""
    device, n = model.device, len(start_ids)
    width = min(batch_size or n, n)
    queue = iter(range(n))
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    layers = model.config.get_text_config().num_hidden_layers
    capacity = CAPACITY * max_length  # room for rows of different ages; compacted when full
    cache = Cache(layers=[SlotLayer(capacity) for _ in range(layers)])

    def admit(k):
        noise = torch.rand(max_length, generator=torch.Generator().manual_seed(seeds[k]))
        return k, [start_ids[k]], prefix_lengths[k], noise

    rows = [admit(next(queue)) for _ in range(width)]  # per row: (sequence k, tokens, greedy until, noise)
    first_slot = torch.zeros(width, dtype=torch.long, device=device)  # each row's first cache slot
    step_input = torch.tensor([r[1][0] for r in rows], device=device)
    arange = torch.arange(capacity, device=device)
    noises = torch.stack([r[3] for r in rows]).to(device)
    lengths = torch.ones(width, dtype=torch.long, device=device)
    greedy_until = torch.tensor([r[2] for r in rows], device=device)
    while True:
        slot = cache.get_seq_length()
        if slot == capacity:  # right-align every row's span at the start of the cache
            used = int((slot - first_slot).max())
            new_first = used - (slot - first_slot)
            index = (arange[None, :used] - new_first[:, None] + first_slot[:, None]).clamp(0, capacity - 1)
            for layer in cache.layers:
                layer.compact(index, used)
            first_slot, slot = new_first, used
        mask = (arange[None, :slot + 1] >= first_slot[:, None]).long()
        logits = model(input_ids=step_input[:, None], attention_mask=mask, position_ids=(lengths - 1)[:, None],
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        next_tokens = logits.argmax(-1)
        greedy = lengths < greedy_until
        if not greedy.all():
            u = noises.gather(1, lengths[:, None].clamp(max=max_length - 1)).squeeze(1)
            next_tokens = torch.where(greedy, next_tokens, sampling.sample(logits, u))
        lengths += 1
        ended = torch.isin(next_tokens, eos) | (lengths == max_length)
        new_tokens = next_tokens.tolist()
        for r, row in enumerate(rows):
            row[1].append(new_tokens[r])
        if not ended.any():
            step_input = next_tokens
            continue
        keep = []
        for r in ended.nonzero().squeeze(1).tolist():
            yield rows[r][0], rows[r][1]
            k = next(queue, None)
            if k is None:
                rows[r] = None
                continue
            rows[r] = admit(k)  # the row restarts at the next slot with a fresh sequence
            next_tokens[r] = start_ids[k]
            first_slot[r], lengths[r], greedy_until[r] = slot + 1, 1, prefix_lengths[k]
            noises[r] = rows[r][3].to(device)
        keep = [r for r, row in enumerate(rows) if row is not None]
        if not keep:
            return
        if len(keep) < len(rows):  # the queue is empty: ended rows leave the batch and the cache
            index = torch.tensor(keep, device=device)
            rows = [rows[r] for r in keep]
            next_tokens, first_slot, lengths = next_tokens[index], first_slot[index], lengths[index]
            greedy_until, noises = greedy_until[index], noises[index]
            cache.batch_select_indices(index)
        step_input = next_tokens
