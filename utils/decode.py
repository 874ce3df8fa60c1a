"""The decoder of data-free generation: hybrid greedy-then-sampled decoding of many sequences at once.

Every prompt is one token (the start id). A fixed number of batch rows decode together, one forward per
token through a preallocated KV cache; when a sequence ends (EOS or max_length) its row is refilled at once
with the next waiting sequence, so the batch stays full until the queue is empty (then ended rows leave the
batch and the cache). Each row writes its keys/values at its own positions (slot t holds its token t), so a
refilled row starts again at slot 0 and sees exactly a fresh sequence: the step reads only as many slots as
the longest row holds, masked per row beyond its own length (no slots of other ages, no compaction).
"""
import logging
from dataclasses import dataclass

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from utils.errors import InputError

logger = logging.getLogger("llm_qat.generate")


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
        if self.temperature != 1.0:  # x / 1.0 == x: no pass over [rows, vocab] for the default temperature
            logits = logits / self.temperature
        values, indices = logits.topk(k)  # sorted, most likely first
        probs = values.softmax(-1)
        if self.top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        choice = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=k - 1)
        return indices.gather(-1, choice[:, None]).squeeze(-1)

    def sample_or_argmax(self, logits, greedy, noises, lengths):
        """The next token of every row: the argmax where `greedy`, else a draw at the row's uniform of this
        position (noises[row, length]); each kind computed only for the rows that need it."""
        if greedy.all():
            return logits.argmax(-1)
        sampled = ~greedy
        u = noises.gather(1, lengths[:, None].clamp(max=noises.shape[1] - 1)).squeeze(1)
        if sampled.all():
            return self.sample(logits, u)
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        tokens[greedy] = logits[greedy].argmax(-1)
        tokens[sampled] = self.sample(logits[sampled], u[sampled])
        return tokens


class Rows:
    """This step's write position of every batch row (its own token index) and the slots the step reads."""

    def __init__(self, batch, device):
        self.index = torch.arange(batch, device=device)
        self.pos, self.span = torch.zeros(batch, dtype=torch.long, device=device), 1


class RowLayer(DynamicLayer):
    """One layer's KV cache of max_length slots per row, preallocated: a step writes each row's key/value in
    place at that row's own position (DynamicLayer's torch.cat copies the whole cache at every step)."""

    def __init__(self, capacity, rows):
        super().__init__()
        self.capacity, self.rows = capacity, rows

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        # zeros, not empty: a row's masked slots (never written, or left by the row's previous sequence) are
        # read too; their weight is exactly 0, and 0 * a finite value adds nothing (uninitialized memory may be NaN)
        self.key_buffer = key_states.new_zeros(batch, heads, self.capacity, dim)
        self.value_buffer = value_states.new_zeros(batch, value_states.shape[1], self.capacity, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        r = self.rows
        self.key_buffer[r.index, :, r.pos] = key_states[:, :, 0]
        self.value_buffer[r.index, :, r.pos] = value_states[:, :, 0]
        self.keys, self.values = self.key_buffer[:, :, :r.span], self.value_buffer[:, :, :r.span]
        return self.keys, self.values

    def get_seq_length(self):  # the slots before this step's: the mask then spans r.span slots
        return self.rows.span - 1

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]


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
    state = Rows(width, device)
    cache = Cache(layers=[RowLayer(max_length, state) for _ in range(layers)])

    def admit(k):
        noise = torch.rand(max_length, generator=torch.Generator().manual_seed(seeds[k]))
        return k, [start_ids[k]], prefix_lengths[k], noise

    rows = [admit(next(queue)) for _ in range(width)]  # per row: (sequence k, tokens, greedy until, noise)
    step_input = torch.tensor([r[1][0] for r in rows], device=device)
    arange = torch.arange(max_length, device=device)
    noises = torch.stack([r[3] for r in rows]).to(device)
    lengths = torch.ones(width, dtype=torch.long, device=device)  # tokens per row, this step's included
    greedy_until = torch.tensor([r[2] for r in rows], device=device)
    while True:
        state.pos, state.span = lengths - 1, int(lengths.max())
        mask = (arange[None, :state.span] < lengths[:, None]).long()
        logits = model(input_ids=step_input[:, None], attention_mask=mask, position_ids=state.pos[:, None],
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        greedy = lengths < greedy_until
        next_tokens = sampling.sample_or_argmax(logits, greedy, noises, lengths)
        lengths += 1
        ended = torch.isin(next_tokens, eos) | (lengths == max_length)
        new_tokens = next_tokens.tolist()
        for r, row in enumerate(rows):
            row[1].append(new_tokens[r])
        if not ended.any():
            step_input = next_tokens
            continue
        for r in ended.nonzero().squeeze(1).tolist():
            yield rows[r][0], rows[r][1]
            k = next(queue, None)
            if k is None:
                rows[r] = None
                continue
            rows[r] = admit(k)  # the row restarts at slot 0 with a fresh sequence
            next_tokens[r] = start_ids[k]
            lengths[r], greedy_until[r] = 1, prefix_lengths[k]
            noises[r] = rows[r][3].to(device)
        keep = [r for r, row in enumerate(rows) if row is not None]
        if not keep:
            return
        if len(keep) < len(rows):  # the queue is empty: ended rows leave the batch and the cache
            index = torch.tensor(keep, device=device)
            rows = [rows[r] for r in keep]
            next_tokens, lengths, greedy_until, noises = next_tokens[index], lengths[index], greedy_until[index], noises[index]
            state.index = torch.arange(len(keep), device=device)
            cache.batch_select_indices(index)
        step_input = next_tokens
